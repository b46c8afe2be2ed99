"""Schedule check: every stage's training policy is valid now, not when that stage starts.

Why: the trainer builds stage N's model, LoRA layout and loader only when stage N begins, so a typo in the last
stage of a schedule otherwise surfaces after the earlier stages have run for hours.
"""

from __future__ import annotations

from mmtrain.doctor.context import Context, Unavailable, stage_label
from mmtrain.doctor.report import Check, row
from mmtrain.model.lora import PARTS


def check_stages(ctx: Context) -> Check:
    """lr_per_part names real parts, and the freeze / LoRA policy applies to the model (built on the meta device)
    and leaves something to train (loader keys and values are checked when the recipe loads)."""
    problems: list[tuple[str, str]] = []
    summary = []
    for index, stage in enumerate(ctx.recipe.stages):
        where = stage_label(stage)
        parts = sorted(set(stage.optimizer.lr_per_part) - set(PARTS))
        if parts:
            problems.append(("FAIL", f"{where}: optimizer.lr_per_part names {parts}; parts are {list(PARTS)}"))
        try:
            counts = ctx.trainable(index)
        except Unavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, Unavailable) or cause is None:
                problems.append(("WARN", f"{where}: freeze / LoRA policy not checked ({exc})"))
            else:
                problems.append(("FAIL", f"{where}: {exc}"))
            continue
        if not any(counts.values()):
            problems.append(("FAIL", f"{where} trains nothing (vision, connector and llm all frozen)"))
        summary.append(f"{stage.name} {sum(counts.values()):,}")
    return row("stages", problems, "trainable parameters: " + ", ".join(summary))
