"""The nn.Module a program describes, and its inputs.

Building is deterministic in the program alone (weights are drawn from a generator seeded by
the program's seed and the block's index), so a printed program literal rebuilds the same model.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .blocks import APPLY, BUILD, ComputedWeightConv, GrammarError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}
INPUT_STREAMS = {"example": 1, "fresh": 2, "fresh2": 3}


class FuzzModel(nn.Module):
    """Applies the program's blocks in order; `statics` holds each block's spec and input shape."""

    def __init__(self, blocks: list[nn.Module], statics: list[dict]):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.statics = statics

    def forward(self, x):
        for mods, spec in zip(self.blocks, self.statics):
            x = APPLY[spec["op"]](mods, spec, x)
        return x


def make_inputs(program: dict, stream: str = "example") -> torch.Tensor:
    """The model's input: `example` (given to optimize) or `fresh`/`fresh2` (other values)."""
    g = torch.Generator().manual_seed(program["seed"] * 10 + INPUT_STREAMS[stream])
    x = torch.randn(program["input"], generator=g).to(DTYPES[program["dtype"]])
    if program.get("channels_last") and x.dim() in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x


def build_model(program: dict) -> nn.Module:
    """Build the model; raises GrammarError when the blocks do not fit the input's shape."""
    probe = torch.randn(program["input"], generator=torch.Generator().manual_seed(program["seed"]))
    blocks, statics = [], []
    with torch.random.fork_rng(devices=[]):
        for i, spec in enumerate(program["blocks"]):
            torch.manual_seed(program["seed"] * 7919 + i)
            static = {**spec, "in_shape": tuple(probe.shape)}
            try:
                mods = BUILD[spec["op"]](spec, tuple(probe.shape)).eval()  # the probe must not move BN statistics
                with torch.no_grad():
                    probe = APPLY[spec["op"]](mods, static, probe.clone())
            except (RuntimeError, ValueError, IndexError, ZeroDivisionError) as e:
                raise GrammarError(f"block {i} ({spec['op']}): {type(e).__name__}: {e}") from e
            blocks.append(mods)
            statics.append(static)
        model = FuzzModel(blocks, statics).eval().to(DTYPES[program["dtype"]])
        _add_extras(model, program)
    return model


def _leaves(model: nn.Module, kinds: tuple) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, kinds)]


def _hookable(model: nn.Module) -> list[nn.Module]:
    """torch.nn's own leaf modules (what a user hooks: a conv, a BN, a Linear, an activation)."""
    return [m for m in model.modules() if not list(m.children()) and type(m).__module__.startswith("torch.nn.")]


def double_output(module, args, output):
    return output * 2


def halve_input(module, args):
    return (args[0] * 0.5,) + tuple(args[1:])


def _add_extras(model: nn.Module, program: dict):
    """Train mode, weight norm, hooks: applied to the built model, picked by index modulo count."""
    # (a conv whose weight a `ws_conv` block reads without calling it would keep the weight its
    # weight_norm hook computed once: not what weight norm on a conv means)
    inner = {id(m.conv) for m in model.modules() if isinstance(m, ComputedWeightConv)}
    convs = [c for c in _leaves(model, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) if id(c) not in inner]
    for wn in program.get("weight_norm", []):
        if convs:
            conv = convs[wn["conv"] % len(convs)]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if wn["legacy"]:
                    torch.nn.utils.weight_norm(conv)
                else:
                    torch.nn.utils.parametrizations.weight_norm(conv)
    if program.get("train"):
        model.train()
    bns = _leaves(model, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
    for t in program.get("train_bn", []):
        if bns:
            bns[t["bn"] % len(bns)].train()
    leaves = _hookable(model)
    for h in program.get("hooks", []):
        if leaves:
            m = leaves[h["leaf"] % len(leaves)]
            if h["kind"] == "forward":
                m.register_forward_hook(double_output)
            else:
                m.register_forward_pre_hook(halve_input)


def check_runs(program: dict) -> None:
    """Build the model and run it eagerly on each of its inputs (a failure is a grammar bug).
    A fresh build per run: the model may be in train mode, and legacy weight norm cannot be
    deep-copied once it has run."""
    try:
        with torch.no_grad():
            for stream in INPUT_STREAMS:
                build_model(program)(make_inputs(program, stream))
    except Exception as e:
        raise GrammarError(f"eager run failed: {type(e).__name__}: {e}") from e
