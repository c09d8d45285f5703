"""Train-time to deploy-time structure with `optimize`: multi-branch blocks become one conv each.

    python examples/reparam_deploy.py             # timm RepVGG-A0 and a DBB-style net, 224x224
    python examples/reparam_deploy.py --size 128  # quicker

No block-specific code is involved: `optimize` finds every linear region (branches of convs,
BatchNorms, avg-pools and identities summed together) in the captured graph and merges it.
Random weights with random BatchNorm statistics stand in for a trained model (nothing is
downloaded). For each model it prints the report summary, the convolutions before/after, the
measured error on a fresh input and the eager latency before/after (median of a few runs).
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch
import torch.nn as nn

from fxrewrite import optimize, verify
from fxrewrite.rewrite import ops


def conv_bn(cin, cout, k, stride=1, padding=0):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, padding, bias=False), nn.BatchNorm2d(cout))


class DBBBlock(nn.Module):
    """Diverse Branch Block (train-time): kxk, 1x1, 1x1 -> kxk and 1x1 -> avg-pool, each with BN.

    The paper pads the 1x1's output with its BN's bias before the kxk / avg-pool (so that the merge
    is exact); here the 1x1 conv carries that padding itself, which computes the same thing."""

    def __init__(self, cin, cout, k=3, stride=1):
        super().__init__()
        p = k // 2
        self.kxk = conv_bn(cin, cout, k, stride, p)
        self.one = conv_bn(cin, cout, 1, stride)
        self.one_kxk = nn.Sequential(conv_bn(cin, cin, 1, padding=p), conv_bn(cin, cout, k, stride))
        self.one_avg = nn.Sequential(conv_bn(cin, cout, 1, padding=p), nn.AvgPool2d(k, stride),
                                     nn.BatchNorm2d(cout))
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.kxk(x) + self.one(x) + self.one_kxk(x) + self.one_avg(x))


class DBBNet(nn.Module):
    """A small classifier of DBB blocks (widths 32 -> 128, four stride-2 stages)."""

    def __init__(self, widths=(32, 64, 96, 128), num_classes=10):
        super().__init__()
        blocks, cin = [], 3
        for w in widths:
            blocks += [DBBBlock(cin, w, stride=2), DBBBlock(w, w)]
            cin = w
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


def randomize_bn(model: nn.Module) -> nn.Module:
    """Stand-in for trained statistics (fresh BNs are the identity, which hides merge mistakes)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


def median_ms(model, x, iters):
    with torch.no_grad():
        model(x)
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def convs(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "call_function" and n.target is ops.conv)


def deploy(name: str, model: nn.Module, x: torch.Tensor, iters: int):
    train_graph = optimize(model, x, passes=[], inplace=False)  # captured only: the train-time structure
    fast = optimize(model, x)
    print(f"\n== {name}\n{fast.report.summary()}")
    print(f"convolutions: {convs(train_graph)} -> {convs(fast)}")
    result = verify(model, fast, torch.randn_like(x))
    print(f"error on a fresh input: max abs {result.max_abs:.3g}, max rel {result.max_rel:.3g} "
          f"({'PASS' if result.passed else 'FAIL'}, within {next(iter(result.outputs.values())).tolerance})")
    before, after = median_ms(model, x, iters), median_ms(fast, x, iters)
    print(f"eager latency (median of {iters}, {torch.get_num_threads()} threads): "
          f"{before:.1f} ms -> {after:.1f} ms ({before / after:.2f}x)")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--iters", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(1, 3, args.size, args.size)
    deploy("timm repvgg_a0", randomize_bn(timm.create_model("repvgg_a0", pretrained=False)), x, args.iters)
    deploy("DBB-style net", randomize_bn(DBBNet()), x, args.iters)


if __name__ == "__main__":
    main()
