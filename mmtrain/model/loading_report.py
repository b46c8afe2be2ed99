"""Every checkpoint tensor accounted for: what a load left unfilled, what it did not use, and what did not fit.

transformers reports this as `output_loading_info` and only logs it; a training run must instead stop, naming the
tensors, so a family whose checkpoint has weights our model lacks (or the reverse) is caught before step 1.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from mmtrain.errors import UserError

SHOWN = 8
"""Tensor names listed per kind in an error; the rest are counted."""


def listing(names: Iterable[str]) -> str:
    """`a, b, c` (sorted) or `a, b, … and N more`."""
    names = sorted(names)
    shown = ", ".join(names[:SHOWN])
    return shown if len(names) <= SHOWN else f"{shown}, … and {len(names) - SHOWN} more"


def refuse_unaccounted(source: str | Path, what: str, missing: Iterable[str] = (), unexpected: Iterable[str] = (),
                       mismatched: Iterable[str] = ()) -> None:
    """UserError naming every kind of unaccounted tensor, or nothing when all three are empty."""
    missing, unexpected, mismatched = sorted(missing), sorted(unexpected), sorted(mismatched)
    problems = []
    if missing:
        problems.append(f"{len(missing)} {what} parameter(s) the checkpoint does not have: {listing(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} checkpoint tensor(s) with no place in the {what}: {listing(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} tensor(s) whose shape differs from the {what}'s: {listing(mismatched)}")
    if problems:
        raise UserError(f"{source}: not every weight is accounted for: " + "; ".join(problems))


def check_loading_info(info: dict, source: str | Path, what: str, own_roots: Iterable[str] | None = None) -> list[str]:
    """transformers' `output_loading_info` → UserError on any missing, unexpected or mis-shaped tensor.

    `own_roots`: when the checkpoint may hold more than this part (a CLIP or SigLIP checkpoint read for its vision
    tower), the first name components of the part's own tensors; unexpected tensors outside them belong to the other
    parts and are returned (for the caller to count) rather than refused."""
    unexpected = sorted(info.get("unexpected_keys") or ())
    roots = set(own_roots) if own_roots is not None else None
    other = [n for n in unexpected if roots is not None and n.split(".")[0] not in roots]
    mismatched = [m[0] if isinstance(m, tuple) else m for m in (info.get("mismatched_keys") or ())]
    refuse_unaccounted(source, what, info.get("missing_keys") or (), sorted(set(unexpected) - set(other)), mismatched)
    errors = list(info.get("error_msgs") or ())
    if errors:
        raise UserError(f"{source}: loading the {what} failed: {'; '.join(map(str, errors))}")
    return other
