"""A seeded differential fuzzer for `optimize` and its options.

A case is one seed: a random model *program* (plain data, `grammar`), the nn.Module that
interprets it (`model`), and one `optimize` option, checked against a float64 oracle
(`oracle`). Failing programs are shrunk (`shrink`) and printed as a reproduction; what was drawn
and what was rewritten is counted (`coverage`) so that a clean run cannot come from skipping.

    python -m fxrewrite.fuzz --n 10000 --jobs 2 --report RELIABILITY.md
"""
from .grammar import generate
from .model import build_model, make_inputs
from .oracle import OPTIONS, CaseResult, check_program, run_case

__all__ = ["generate", "build_model", "make_inputs", "OPTIONS", "CaseResult", "check_program", "run_case"]
