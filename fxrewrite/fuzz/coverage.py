"""Counters, so that a clean run cannot come from skipping: constructs drawn, rewrites applied,
skips by reason, failures by class; and the RELIABILITY.md table.

Rewrites are read from each case's report records. Which *branch kind* was merged is not in
the record's text (it lists op kinds, not branches), so it is told from the cleanup records:
a branch counts as merged when one of its modules' tensors was "absorbed into" a `*_reparam_*`
weight; a branch without tensors (identity, plain avg-pool) when its block's other modules were.
"""
from __future__ import annotations

import re
from collections import Counter

from .blocks import GrammarError
from .model import build_model


def branch_kind(b: dict) -> str:
    if b["kind"] != "conv":
        return {"seq": "1x1->kxk"}.get(b["kind"], b["kind"])
    if b.get("groups") == "dw":
        return "depthwise"
    if b.get("groups", 1) != 1:
        return "grouped"
    kh, kw = b["k"]
    return "1x1" if (kh, kw) == (1, 1) else "1xk" if kh == 1 else "kx1" if kw == 1 else "kxk"


def _unaligned(b: dict, stride: int) -> bool:
    if b["kind"] not in ("conv", "seq"):
        return b["kind"] == "avgpool" and (b["stride"] != stride or (b["k"], b["pad"]) != (3, 1) or not b["cip"])
    return b["stride"] != stride or b["dil"] != 1 or list(b["pad"]) != [k // 2 for k in b["k"]] or b["k"][0] % 2 == 0


def block_constructs(spec: dict, rank: int, index: int) -> set[str]:
    op, out = spec["op"], {f"op:{spec['op']}"}
    if op in ("conv", "convT"):
        out |= {f"{op}{rank - 2}d", f"pad:{spec['pad'] if isinstance(spec['pad'], str) else 'int'}",
                f"mode:{spec.get('mode', 'zeros')}", f"groups:{'dw' if spec['groups'] == 'dw' else min(2, spec['groups'])}",
                f"bias:{spec['bias']}", f"bn:{spec['bn']}"}
        out |= {"dilation2"} if spec["dil"] > 1 else set()
        out |= {"stride2"} if spec["stride"] > 1 else set()
        out |= {f"scale:{spec['scale']}"} if spec.get("scale") else set()
    if op == "branches":
        stride = spec["branches"][0].get("stride", 1)
        out |= {f"branch:{branch_kind(b)}" for b in spec["branches"]}
        out |= {"branch:with_bn" for b in spec["branches"] if b.get("bn")}
        out |= {"branch:unmergeable_geometry" for b in spec["branches"][1:] if _unaligned(b, stride)}
        out |= {"avgpool:count_include_pad=False" for b in spec["branches"] if b["kind"] == "avgpool" and not b["cip"]}
    variant = {"residual": "add", "mutate": "how", "view": "how", "affine": "kind", "cat": "with_input", "chain": "pad",
               "ws_conv": "how", "lin_bn_view": "how", "stateful": "how"}
    if op in variant:
        out.add(f"{op}:{spec[variant[op]]}")
    if op == "mutate":
        out |= {f"mutate:{spec['when']}"} | ({"mutate:model_input"} if index == 0 else set())
    out |= {f"{op}:ssf"} if spec.get("ssf") else set()
    out |= {f"norm:{spec['swapped']}"} if spec.get("swapped") else set()
    out |= {"lora:merged_in_forward"} if op == "lora" and spec.get("merged") else set()
    if op == "linear":
        out |= {f"linear:rank{rank}"} | ({f"linear+bn1d:rank{rank}"} if spec.get("bn") else set())
    if spec.get("act"):
        out |= {f"act:{spec['act']}", f"act_how:{spec.get('act_how', 'function')}"}
    if spec.get("inplace") or spec.get("scale_inplace"):
        out.add("affine:mul_")
    return out


def constructs(program: dict) -> set[str]:
    """Every grammar construct the program uses."""
    rank = len(program["input"])
    out = {f"input:rank{rank}", f"dtype:{program['dtype']}"}
    out |= {"channels_last"} if program.get("channels_last") else set()
    out |= {"train:model"} if program.get("train") else set()
    out |= {"train:one_bn"} if program.get("train_bn") else set()
    out |= {f"hook:{h['kind']}" for h in program.get("hooks", [])}
    out |= {f"weight_norm:{'legacy' if w['legacy'] else 'parametrizations'}" for w in program.get("weight_norm", [])}
    try:
        statics = build_model(program).statics
    except GrammarError:
        return out
    for i, spec in enumerate(statics):
        out |= block_constructs(spec, len(spec["in_shape"]), i)
    return out


def _absorbed(records) -> set[str]:
    """Module paths whose tensors the cleanup says were "absorbed into" derived ones."""
    return {node for pass_name, node, action, detail in records
            if pass_name == "cleanup" and "absorbed into" in detail}


def _merged(path: str, absorbed: set[str], tensors: list[str]) -> bool:
    """A module was merged away when it was absorbed and nothing derived from it by name is left
    (a BN folded into it leaves `blocks_3_conv_bn_weight`; a merge leaves `add_2_reparam_weight`)."""
    flat = path.replace(".", "_") + "_"
    return path in absorbed and not any(t.startswith(flat) or t.startswith(path + ".") for t in tensors)


def _merged_blocks(program: dict, records, tensors: list[str] | None) -> Counter:
    """Merges per construct, told from which modules were merged away (optimize cases only)."""
    out = Counter()
    if tensors is None:
        return out
    absorbed = _absorbed(records)
    for i, spec in enumerate(program["blocks"]):
        mine = {p.split(".", 2)[2] for p in absorbed if p.startswith(f"blocks.{i}.") and _merged(p, absorbed, tensors)}
        if not mine:
            continue
        if spec["op"] == "branches":
            for j, b in enumerate(spec["branches"]):
                if any(k.startswith(f"b{j}_") for k in mine) or b["kind"] in ("identity", "avgpool"):
                    out[f"merge:branch:{branch_kind(b)}"] += 1
        kind = {"chain": "chain:conv->conv", "linchain": "chain:linear->linear", "lora": "lora",
                "flatten_fc": "conv_into_fc(RepMLP)", "affine": "affine"}.get(spec["op"])
        out.update([f"merge:{kind}"] if kind else [])
        out.update(["merge:affine(after conv/linear)"] if "scale" in mine and spec["op"] != "affine" else [])
    return out


def rewrites(program: dict, records, tensors: list[str] | None = None) -> Counter:
    """Rewrites applied in one case, by kind."""
    out = Counter()
    for pass_name, node, action, detail in records:
        if action != "rewrote":
            continue
        if pass_name == "fold_batchnorm":
            rule = detail.split(":", 1)[0]
            out[f"fold_bn:{'transposed_conv' if 'tconv' in detail else rule.replace('fold_bn_into_', '')}"] += 1
        elif pass_name == "merge_branches":
            out["merge:RepMLP_record" if "RepMLP" in detail else "merge:region"] += 1
        else:
            out[pass_name] += 1
    return out + _merged_blocks(program, records, tensors)


_NAME = re.compile(r"\b(?!aten\b)(?!conv\d+x\d+\b)[A-Za-z_][\w.]*\d[\w.]*\b|\bblocks[\w.]*|\b\d[\d,.e+-]*\b")


def normalise(reason: str) -> str:
    """A skip reason without node names and numbers, so equal reasons count together."""
    return re.sub(r"\s+", " ", _NAME.sub("#", reason))[:140]


def skips(records) -> Counter:
    return Counter(f"{p}: {normalise(d)}" for p, _, a, d in records if a == "skipped")


class Coverage:
    """Totals over a run."""

    def __init__(self):
        self.cases, self.seconds = Counter(), Counter()
        self.drawn, self.applied, self.skipped = Counter(), Counter(), Counter()
        self.failures, self.rejected = Counter(), Counter()
        self.examples: dict[str, object] = {}  # failure class -> first CaseResult

    def add(self, res, drawn: set[str] | None = None):
        self.cases[res.option] += 1
        self.seconds[res.option] += res.seconds
        self.drawn.update(drawn if drawn is not None else constructs(res.program))
        self.applied.update(rewrites(res.program, res.records, res.tensors))
        self.skipped.update(skips(res.records))
        for cls in res.failures:
            self.failures[cls] += 1
            self.examples.setdefault(cls, res)
        if res.rejected:
            self.rejected[normalise(res.rejected)] += 1


def _table(head: tuple, rows) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return out + ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]


def markdown(cov: Coverage, wall: float, command: str, repros: dict[str, str] | None = None) -> str:
    """RELIABILITY.md: what ran, what failed (with reproductions), what was drawn and rewritten."""
    n = sum(cov.cases.values())
    lines = ["# Reliability: differential fuzzing", "",
             f"`{command}`: {n} cases in {wall:.0f} s wall; {sum(cov.failures.values())} failures.", "",
             "## Cases per option", ""]
    lines += _table(("option", "cases", "s/case"), [(o, c, f"{cov.seconds[o] / c:.3f}") for o, c in sorted(cov.cases.items())])
    lines += ["", "## Failures by class", ""]
    lines += _table(("class", "cases", "first seed", "option", "detail"),
                    [(k, v, cov.examples[k].seed, cov.examples[k].option, cov.examples[k].failures[k][:160])
                     for k, v in cov.failures.most_common()]) if cov.failures else ["none"]
    for cls, text in (repros or {}).items():
        lines += ["", f"### {cls}", "", "```python", text.rstrip(), "```"]
    lines += ["", "## Documented errors (rejected, not failures)", ""]
    lines += _table(("reason", "cases"), cov.rejected.most_common(20)) if cov.rejected else ["none"]
    lines += ["", "## Constructs drawn", ""] + _table(("construct", "cases"), sorted(cov.drawn.items()))
    lines += ["", "## Rewrites applied", ""] + _table(("rewrite", "count"), sorted(cov.applied.items()))
    lines += ["", "## Skips by reason (top 60)", ""] + _table(("reason", "count"), cov.skipped.most_common(60))
    return "\n".join(lines) + "\n"
