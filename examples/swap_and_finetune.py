"""Architecture swaps on two small classifiers trained on scikit-learn's digits (no download):

1. a pre-LN transformer (each 8x8 image read as 8 tokens of 8 pixels) trained with LayerNorm,
   swapped to DyT with `optimize(model, x, passes=["norm_to_dyt"])`, calibrated with
   `fxrewrite.calibrate` (alpha fitted to each replaced LayerNorm on training batches) and briefly
   fine-tuned;
2. an MLP trained with ReLU, swapped to SmeLU and briefly fine-tuned.

    python examples/swap_and_finetune.py

Prints test accuracy before the swap, right after it (and after calibration), and after
fine-tuning, as a markdown table. Fixed seeds; about a minute on two CPU cores.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from fxrewrite import calibrate, optimize
from fxrewrite.passes.swaps import relu_to_smelu


def data():
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0  # pixels 0..16 -> 0..1
    y = torch.tensor(digits.target)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    return xtr, ytr, xte, yte


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.norm1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.norm2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        t, d = x.shape[1], x.shape[2]
        q, k, v = self.qkv(self.norm1(x)).view(-1, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(-1, t, d)
        x = x + self.proj(a)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DigitsTransformer(nn.Module):
    def __init__(self, d=32, heads=2, depth=2):
        super().__init__()
        self.embed = nn.Linear(8, d)
        self.pos = nn.Parameter(torch.randn(1, 8, d) * 0.1)
        self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(depth)])
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, x):  # x: (batch, 64) -> 8 tokens (image rows) of 8 pixels
        h = self.embed(x.view(-1, 8, 8)) + self.pos
        return self.head(self.norm(self.blocks(h)).mean(1))


def mlp():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))


def train(model, x, y, epochs, lr, seed):
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x, y):
    model.eval()
    return float((model(x).argmax(1) == y).float().mean()) * 100


def main():
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = data()
    rows = []

    # 1. transformer: LayerNorm -> DyT (+ calibration) -> fine-tune
    torch.manual_seed(0)
    model = train(DigitsTransformer(), xtr, ytr, epochs=8, lr=3e-3, seed=0)
    before = accuracy(model, xte, yte)
    gm = optimize(model, xtr[:64], passes=["norm_to_dyt"])
    swapped = accuracy(gm, xte, yte)
    print("\n".join(r.detail for r in gm.report.records if r.pass_name == "norm_to_dyt"))
    fit, held = list(xtr[:512].split(128)), list(xtr[512:768].split(128))  # training images only
    result = calibrate(gm, fit, holdout=held, reference=model)
    print(result)
    calibrated = accuracy(gm, xte, yte)
    train(gm, xtr, ytr, epochs=2, lr=1e-3, seed=1)
    rows.append(("transformer, LayerNorm -> DyT", before, swapped, calibrated, accuracy(gm, xte, yte)))

    # 2. MLP: ReLU -> SmeLU -> fine-tune
    torch.manual_seed(0)
    net = train(mlp(), xtr, ytr, epochs=15, lr=3e-3, seed=0)
    before = accuracy(net, xte, yte)
    gs = optimize(net, xtr[:64], passes=[relu_to_smelu(beta=1.0)])
    print("\n".join(r.detail for r in gs.report.records if r.pass_name == "relu_to_smelu"))
    swapped = accuracy(gs, xte, yte)
    train(gs, xtr, ytr, epochs=2, lr=1e-3, seed=1)
    rows.append(("MLP, ReLU -> SmeLU(beta=1)", before, swapped, None, accuracy(gs, xte, yte)))

    print(f"\ndigits: {len(xtr)} training / {len(xte)} test images; {time.perf_counter() - t0:.0f} s in all\n")
    print("| model, swap | before swap | right after swap | after calibration | after fine-tune (2 epochs) |")
    print("|---|---|---|---|---|")
    for name, b, s, c, f in rows:
        cal = f"{c:.1f}%" if c is not None else "-"
        print(f"| {name} | {b:.1f}% | {s:.1f}% | {cal} | {f:.1f}% |")


if __name__ == "__main__":
    main()
