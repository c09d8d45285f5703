"""fx-rewrite: a graph-rewrite compiler for PyTorch models.

    from fxrewrite import optimize, verify
    fast = optimize(model, example_inputs)   # a new module; `model` is untouched
    print(fast.report)
    verify(model, fast, example_inputs)
"""
from .api import optimize
from .calibrate import CalibrationReport, calibrate  # architecture swaps: fit DyT to the norms it replaced
from .rewrite.capture import CaptureError, InputError
from .rewrite.mode import ModeError
from .onnx_export import OnnxExportError, check_onnx, export_onnx
from .rewrite.report import Report
from .rewrite.verify import VerificationError, VerifyResult, verify

__all__ = ["optimize", "verify", "Report", "VerifyResult", "VerificationError", "CaptureError", "InputError", "ModeError",
           "export_onnx", "check_onnx", "OnnxExportError", "calibrate", "CalibrationReport"]
