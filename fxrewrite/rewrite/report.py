"""The record of a rewrite: every match, every skip with its reason, every weight derived."""
from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Record:
    pass_name: str
    node: str
    action: str  # "rewrote", "skipped", "removed", "note"
    detail: str = ""


@dataclass
class Report:
    """What `optimize` did. Prints as a table; `counts()` gives per-pass, per-action totals."""

    records: list[Record] = field(default_factory=list)
    error: dict | None = None  # filled by `optimize(..., check=True)`: max abs/rel error per output
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage (capture, each pass, ...)

    @contextmanager
    def timed(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0

    def rewrote(self, pass_name: str, node: str, detail: str):
        self.records.append(Record(pass_name, node, "rewrote", detail))

    def skip(self, pass_name: str, node: str, reason: str):
        self.records.append(Record(pass_name, node, "skipped", reason))

    def note(self, pass_name: str, node: str, detail: str):
        self.records.append(Record(pass_name, node, "note", detail))

    def removed(self, pass_name: str, node: str, detail: str):
        self.records.append(Record(pass_name, node, "removed", detail))

    def counts(self) -> Counter:
        return Counter((r.pass_name, r.action) for r in self.records)

    def count(self, pass_name: str, action: str = "rewrote") -> int:
        return self.counts()[(pass_name, action)]

    def skipped(self, pass_name: str | None = None) -> list[Record]:
        return [r for r in self.records if r.action == "skipped" and pass_name in (None, r.pass_name)]

    def __len__(self):
        return len(self.records)

    def summary(self) -> str:
        rows = sorted(self.counts().items())
        return ", ".join(f"{p} {a} {n}" for (p, a), n in rows) or "nothing matched"

    def table(self, max_rows: int = 200) -> str:
        head = ("pass", "node", "action", "detail")
        rows = [(r.pass_name, r.node, r.action, r.detail) for r in self.records]
        shown = rows[:max_rows]
        widths = [max([len(h)] + [len(row[i]) for row in shown]) for i, h in enumerate(head[:3])]
        fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
        lines = [fmt.format(*head), fmt.format(*("-" * w for w in widths), "-" * 6)]
        lines += [fmt.format(*row) for row in shown]
        if len(rows) > max_rows:
            lines.append(f"... {len(rows) - max_rows} more records")
        lines.append(f"summary: {self.summary()}")
        if self.error is not None:
            lines.append("error: " + "; ".join(f"{k}: max abs {v['max_abs']:.3g}, max rel {v['max_rel']:.3g}"
                                             + (f" (within {v['tolerance']})" if v.get("tolerance") else "")
                                             for k, v in self.error.items()))
        return "\n".join(lines)

    def __str__(self):
        return self.table()
