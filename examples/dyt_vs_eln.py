"""LayerNorm -> DyT against LayerNorm -> ELN on one small pre-LN transformer, trained first on
scikit-learn's digits (no download) so that its LayerNorms see realistic inputs:

    python examples/dyt_vs_eln.py            # --quick: shorter training and fine-tune (the test)

The model: each 8x8 digit is read as 8 tokens (image rows) of 8 pixels, embedded to d=32, then
3 pre-LN blocks (2 heads, MLP 2d) and a final LayerNorm before the mean-pooled linear head: 7
LayerNorms, default init (weight 1, bias 0), trained with Adam on cross-entropy. For each swap,
`optimize(model, x, passes=["lift_norms", "norm_to_dyt"])` (the "swap_dyt" preset) or
`passes=["lift_norms", "norm_to_eln"]`, then:

1. right after the swap: the model output's (the logits') max relative deviation from the
   original model (`rewrite.verify.deviation`: max|swapped - original| / max|original|) on the
   held-out images (the digits test split);
2. `fxrewrite.calibrate` on a few batches of training images (DyT fits alpha, ELN beta; the
   per-channel weight and bias stay the LayerNorm's): the mean over the swapped layers of the
   relative error E = ||m(x) - LN(x)|| / ||LN(x)||, before -> after the fit, on the calibration
   batches and on the held-out images, and the output deviation after it (held-out images);
3. a short fine-tune of the whole swapped model (train mode, Adam), distilled towards the
   original model's logits (MSE) on training images, then the output deviation on the held-out
   images again.

Prints the seeds, the model and a markdown table (one row per swap); test accuracy is printed as
well, for orientation. Nothing is tuned for either swap: both get the same batches, steps and
learning rate. Fixed seeds, CPU, one thread; about 25 s on two busy CPU cores (--quick: about 15 s).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from fxrewrite import calibrate, optimize
from fxrewrite.rewrite.verify import deviation

# the digits data, the pre-LN transformer, its training loop and accuracy: the swap example's own
from swap_and_finetune import DigitsTransformer, accuracy, data, train

SEED_TRAIN, SEED_FINETUNE = 0, 1
SWAPS = {"DyT": ["lift_norms", "norm_to_dyt"], "ELN": ["lift_norms", "norm_to_eln"]}


def distill(student, teacher, x, steps, lr, seed, batch=64):
    """`steps` Adam steps on MSE(student(x_b), teacher(x_b)) over random batches of `x`, in train mode."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    teacher.eval()
    student.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,))
        with torch.no_grad():
            target = teacher(x[idx])
        opt.zero_grad()
        F.mse_loss(student(x[idx]), target).backward()
        opt.step()
    return student.eval()


@torch.no_grad()
def output_deviation(model, reference, x) -> float:
    """Max relative deviation of the logits on `x` (one batch: max|diff| / max|reference|)."""
    model.eval()
    return deviation(reference(x), model(x))[1]


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter training (4 epochs) and fine-tune (20 steps)")
    args = ap.parse_args()
    epochs, steps = (4, 20) if args.quick else (10, 100)
    lr_ft = 1e-3
    # one thread: the tensors are tiny, and on a shared few-core machine two threads waiting on each
    # other at every op are many times slower than one (and the results are the same)
    torch.set_num_threads(1)

    t0 = time.perf_counter()
    xtr, ytr, xte, yte = data()
    torch.manual_seed(SEED_TRAIN)
    model = train(DigitsTransformer(depth=3), xtr, ytr, epochs=epochs, lr=3e-3, seed=SEED_TRAIN)
    n_ln = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    n_params = sum(p.numel() for p in model.parameters())
    print(f"seeds: torch.manual_seed({SEED_TRAIN}) for init and training, {SEED_FINETUNE} for each fine-tune; "
          f"train/test split random_state=0")
    print(f"model: pre-LN transformer, 8 tokens x 8 pixels -> d=32, 3 blocks, 2 heads, MLP 64, final LayerNorm, "
          f"mean-pool, linear head; {n_ln} LayerNorms (default init), {n_params} parameters; trained {epochs} epochs "
          f"on digits ({len(xtr)} training images), test accuracy {accuracy(model, xte, yte):.1f}% "
          f"({time.perf_counter() - t0:.1f} s)")

    fit = list(xtr[:512].split(128))  # calibration batches: training images
    held = list(xte.split(180))  # held-out: the test images, never fitted or trained on
    rows = []
    for name, passes in SWAPS.items():
        t1 = time.perf_counter()
        gm = optimize(model, xtr[:64], passes=passes)
        swapped = [r for r in gm.report.records if r.pass_name == passes[-1]]
        print(f"\n== LayerNorm -> {name}: passes={passes}")
        print("\n".join(r.detail for r in swapped))
        dev_swap, acc_swap = output_deviation(gm, model, xte), accuracy(gm, xte, yte)

        cal = calibrate(gm, fit, holdout=held, reference=model)
        print(cal)
        dev_cal, acc_cal = output_deviation(gm, model, xte), accuracy(gm, xte, yte)

        gm.train()  # the optimized result must be trainable as any module
        distill(gm, model, xtr, steps=steps, lr=lr_ft, seed=SEED_FINETUNE)
        dev_ft, acc_ft = output_deviation(gm, model, xte), accuracy(gm, xte, yte)
        print(f"test accuracy: {acc_swap:.1f}% after swap, {acc_cal:.1f}% after calibration, "
              f"{acc_ft:.1f}% after fine-tune ({time.perf_counter() - t1:.1f} s)")
        rows.append((name, len(cal.layers), dev_swap,
                     mean(r.error_before for r in cal.layers), mean(r.error_after for r in cal.layers),
                     mean(r.holdout_before for r in cal.layers), mean(r.holdout_after for r in cal.layers),
                     dev_cal, dev_ft))

    print(f"\ncalibration: {len(fit)} batches of 128 training images; held out: the {len(xte)} test images; "
          f"fine-tune: {steps} Adam steps (lr {lr_ft:g}, batch 64) distilling the original logits (MSE) on "
          f"training images; {time.perf_counter() - t0:.0f} s in all\n")
    print("| swap | layers | after swap: output dev | calibration: mean layer error (calibration batches) "
          "| mean layer error (held out) | after calibration: output dev | after fine-tune: output dev |")
    print("|---|---|---|---|---|---|---|")
    for name, n, ds, eb, ea, hb, ha, dc, df in rows:
        print(f"| {name} | {n} | {ds:.4f} | {eb:.4f} -> {ea:.4f} | {hb:.4f} -> {ha:.4f} | {dc:.4f} | {df:.4f} |")
    print("\noutput dev: max|swapped - original| / max|original| over the test images' logits; "
          "layer error: ||m(x) - LN(x)|| / ||LN(x)|| per swapped layer, averaged, before -> after calibrate")


if __name__ == "__main__":
    main()
