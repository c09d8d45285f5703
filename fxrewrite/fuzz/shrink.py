"""Shrink a failing program while the same failure class persists, and print it as a reproduction.

Greedy: try candidates (drop a block, drop a branch, drop an extra, simplify an attribute) in
order and restart from the first that still fails with the same class. A candidate that no
longer fits its shapes fails as `grammar_bug`, a different class, so it is simply not taken.
"""
from __future__ import annotations

import copy
import pprint

from .oracle import check_program

# attribute -> simpler value (None: delete the key)
SIMPLER = {"act": None, "act_how": None, "scale": None, "scale_inplace": None, "mode": None, "bn": False,
           "bn1": False, "bias1": False, "dil": 1, "stride": 1, "groups": 1, "outpad": 0, "inplace": False,
           "how": "relu_", "add": "plus", "k": 1, "pad": 0}


def _variants(program: dict):
    """Smaller or simpler programs, most aggressive first."""
    for i in range(len(program["blocks"])):
        p = copy.deepcopy(program)
        del p["blocks"][i]
        yield p
    for key in ("hooks", "weight_norm", "train_bn", "train"):
        if program.get(key):
            p = copy.deepcopy(program)
            del p[key]
            yield p
    if program.get("channels_last"):
        yield {**copy.deepcopy(program), "channels_last": False}
    if program["dtype"] == "bfloat16":
        yield {**copy.deepcopy(program), "dtype": "float32"}
    for i, block in enumerate(program["blocks"]):
        for j in range(1, len(block.get("branches", []))):
            p = copy.deepcopy(program)
            del p["blocks"][i]["branches"][j]
            yield p
        yield from _simpler_attributes(program, i)


def _simpler_attributes(program: dict, i: int):
    block = program["blocks"][i]
    for key, simple in SIMPLER.items():
        if key in block and block[key] != simple:
            p = copy.deepcopy(program)
            if simple is None:
                del p["blocks"][i][key]
            else:
                p["blocks"][i][key] = simple
            yield p


def shrink(program: dict, option: str, cls: str, verify64: bool = True, budget: int = 200) -> tuple[dict, int]:
    """The smallest program found (within `budget` case runs) that still fails with `cls`."""
    current, runs, improved = program, 0, True
    while improved and runs < budget:
        improved = False
        for candidate in _variants(current):
            runs += 1
            if cls in check_program(candidate, option, verify64).failures:
                current, improved = candidate, True
                break
            if runs >= budget:
                break
    return current, runs


def reproduction(program: dict, option: str, cls: str, detail: str = "") -> str:
    """A Python snippet that rebuilds the program from its literal and reruns the check."""
    literal = pprint.pformat(program, width=100, sort_dicts=False)
    return (f"# {cls} ({option}): {detail[:200]}\n"
            "import os; os.environ.setdefault('TRITON_INTERPRET', '1')\n"
            "from fxrewrite.fuzz import check_program\n"
            f"program = {literal}\n"
            f"print(check_program(program, {option!r}).failures)\n")
