"""The examples run as smoke tests (small sizes), and what they print is checked."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_example(name: str, *args: str) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_quickstart():
    out = run_example("quickstart.py", "--size", "64", "--iters", "1")
    assert "fold_batchnorm rewrote 53" in out  # every BN of ResNet-50
    assert "error on a fresh input: PASS" in out
    assert re.search(r"optimize channels_last +[\d.]+ ms", out)


def test_reparam_deploy():
    out = run_example("reparam_deploy.py", "--size", "64", "--iters", "1")
    convs = re.findall(r"convolutions: (\d+) -> (\d+)", out)
    assert convs, out
    assert all(int(after) < int(before) for before, after in convs), convs
    assert len(convs) == 2 and "FAIL" not in out and out.count("PASS") == 2


def test_swap_and_finetune():
    out = run_example("swap_and_finetune.py")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| transformer") or line.startswith("| MLP")}
    assert len(rows) == 2, out
    for name, cells in rows.items():
        before, after_ft = float(cells[0].rstrip("%")), float(cells[-1].rstrip("%"))
        assert before > 90 and after_ft > 90, (name, cells)  # fine-tuning recovers the swapped model


def test_generate_compiled_float32_and_bfloat16():
    """Greedy generate() through the backend equals eager token for token (one prompt and a
    left-padded batch), with one fused region per RMSNorm in every compiled graph."""
    for dtype in ("float32", "bfloat16"):
        out = run_example("generate_compiled.py", "--dtype", dtype)
        assert out.count("16 greedy tokens identical to eager") == 2, out
        fused = re.search(r"fused regions per graph: \[([\d, ]+)\] \(the model has (\d+) RMSNorms\)", out)
        assert fused, out
        assert {int(n) for n in fused.group(1).split(",")} == {int(fused.group(2))}, out
        glu = re.search(r"GLU regions per graph: \[([\d, ]+)\] \(the model has (\d+) gated MLPs\)", out)
        assert glu and {int(n) for n in glu.group(1).split(",")} == {int(glu.group(2))}, out


def test_relufication_sparsity():
    out = run_example("relufication_sparsity.py")
    rows = [line for line in out.splitlines() if line.startswith("| layers.")]
    assert len(rows) == 4, out
    for row in rows:
        after = float(row.split("|")[4].strip().rstrip("%"))
        assert after > 30.0, row  # ReLU zeroes about half of each SiLU's inputs
    assert "output deviation" in out


def test_dyt_vs_eln():

    out = run_example("dyt_vs_eln.py", "--quick")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in out.splitlines() if line.startswith("| DyT |") or line.startswith("| ELN |")}
    assert set(rows) == {"DyT", "ELN"}, out
    for name, cells in rows.items():
        numbers = [float(v) for c in cells for v in c.split("->")]
        assert len(numbers) == 8 and all(math.isfinite(v) for v in numbers), (name, cells)
        fit_before, fit_after = (float(v) for v in cells[2].split("->"))
        assert fit_after <= fit_before, (name, cells)  # calibrate keeps a fit only if it lowers E
    # the same, per layer, in calibrate's report: error on the calibration batches before -> after
    layers = [line for line in out.splitlines() if re.match(r"\S+_(dyt|eln) +(DyT|ELN) ", line)]
    assert len(layers) == 2 * int(rows["DyT"][0]), out
    for line in layers:
        before, after = (float(v) for v in re.findall(r"([\d.]+) -> ([\d.]+)", line)[-2])
        assert math.isfinite(before) and after <= before, line
