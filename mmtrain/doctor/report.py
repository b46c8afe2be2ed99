"""The doctor's result rows and their table: one row per check, worst status wins within a row."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

STATUSES = ("PASS", "WARN", "FAIL")


@dataclass
class Check:
    """One pre-flight check: `detail` says what is wrong and what to do (or, on PASS, what was checked)."""

    name: str
    status: str
    """PASS | WARN | FAIL."""
    detail: str

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"check {self.name!r}: status must be one of {STATUSES}, not {self.status!r}")


def row(name: str, problems: Iterable[tuple[str, str]], ok: str) -> Check:
    """A row from (status, message) findings: the worst status, its messages first; `ok` when there are none."""
    found = [(s, m) for s, m in problems if s != "PASS"]
    if not found:
        return Check(name, "PASS", ok)
    worst = max(found, key=lambda f: STATUSES.index(f[0]))[0]
    ordered = sorted(found, key=lambda f: -STATUSES.index(f[0]))
    return Check(name, worst, "; ".join(m for _, m in ordered))


def failures(checks: list[Check]) -> list[Check]:
    """The FAIL rows: the trainer refuses to start when there is any."""
    return [c for c in checks if c.status == "FAIL"]


def format_table(checks: list[Check]) -> str:
    """A plain-text table (name, status, detail), then a one-line verdict."""
    width = max([len("check")] + [len(c.name) for c in checks])
    lines = [f"{'check':<{width}}  status  detail", f"{'-' * width}  ------  {'-' * 40}"]
    lines += [f"{c.name:<{width}}  {c.status:<6}  {c.detail}" for c in checks]
    counts = {s: sum(c.status == s for c in checks) for s in STATUSES}
    verdict = "not ready: fix the FAIL rows" if counts["FAIL"] else "ready to train"
    lines.append(f"{counts['PASS']} pass, {counts['WARN']} warn, {counts['FAIL']} fail: {verdict}")
    return "\n".join(lines)
