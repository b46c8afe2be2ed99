"""Run on 2 ranks by test_stage_builds.py: two stage models built and trained one after another in one process under
ZeRO-3, per LLM family, as the trainer does (rank 0 alone builds the starting weights outside the partitioned build,
so on rank 1 the partitioned build is the first to need the LLM's classes).

Writes OUT/rank-N.json: per family, whether the LLM's modeling module was imported before the first build, the
losses of both stages on one fixed batch, and the instance attributes of both models' attention modules.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from mmtrain.config import StageSpec, recipe_from_dict
from mmtrain.model import VisionLanguageModel, VLMConfig, num_image_slots, tiny_config
from mmtrain.model.llm import decoder_layers, self_attention
from mmtrain.train.dsconfig import deepspeed_config
from mmtrain.train.runtime import init_distributed
from mmtrain.train.stage_model import build_stage_model, optimizer_and_schedule
from mmtrain.train.zero import gathered_state_dict, partitioned_build

FAMILIES = ("llama", "qwen2", "mistral", "gemma")


def family_config(family: str) -> VLMConfig:
    config = tiny_config("abstractor", llm_family=family, layers=2, vocab_size=128,
                         connector_config={"num_queries": 4, "num_layers": 1})
    config.text_config["head_dim"] = 16  # gemma's default (256) would make the tiny model needlessly wide
    return config


def fixed_batch(config: VLMConfig) -> dict[str, torch.Tensor]:
    """Two samples, one image each, the same on every rank (so both ranks must see the same loss)."""
    gen = torch.Generator().manual_seed(7)
    slots = num_image_slots(config)
    vocab = config.text_config["vocab_size"] - 2
    rows = [torch.randint(1, vocab, (3,), generator=gen).tolist() + [config.image_token_id] * slots
            + torch.randint(1, vocab, (8,), generator=gen).tolist() for _ in range(2)]
    input_ids = torch.tensor(rows)
    size = config.vision_config["image_size"]
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "labels": input_ids.masked_fill(input_ids == config.image_token_id, -100),
            "pixel_values": torch.randn(2, 3, size, size, generator=gen),
            "image_slots": torch.tensor([[0, 3], [1, 3]])}


def stage(name: str, **fields) -> StageSpec:
    spec = {"name": name, "data": [{"shards": "unused"}], "micro_batch": 2, "steps": 2,
            "deepspeed": "ds_configs/zero3.json", **fields}
    return recipe_from_dict({"name": "probe", "stages": [spec]}).stages[0]


def attention_attributes(engine) -> list[list[str]]:
    return [sorted(vars(self_attention(layer))) for layer in decoder_layers(engine.module.llm)]


def train(config: VLMConfig, spec: StageSpec, state, rank: int, batch, steps: int) -> tuple[list[float], object]:
    import deepspeed

    ds_config = deepspeed_config(spec, 2, "fp32")
    model, _ = build_stage_model(config, spec, ds_config, True, state, rank, seed=1, checkpointing={})
    optimizer, scheduler, _ = optimizer_and_schedule(model, spec)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    losses = []
    for _ in range(steps):
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with torch.no_grad():
        losses.append(engine(**batch).loss.item())  # after the last update: where the next stage starts
    return losses, engine


def marks_instances(cls: type) -> type:
    """A class decorator that wraps `__init__`, as transformers' kernel hooks do."""
    init = cls.__init__

    def marked_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.marked = True

    cls.__init__ = marked_init
    return cls


def guard_outcomes(config: VLMConfig, spec: StageSpec) -> dict[str, str]:
    """What partitioned_build says of a decorated and of a plain class first defined inside it."""
    outcomes = {}
    for name, decorate in (("decorated", marks_instances), ("plain", lambda cls: cls)):
        try:
            with partitioned_build(config, deepspeed_config(spec, 2, "fp32"), True):
                @decorate
                class DefinedInside(nn.Module):
                    def __init__(self) -> None:
                        super().__init__()
                        self.weight = nn.Parameter(torch.zeros(4))

                DefinedInside()
            outcomes[name] = "built"
        except RuntimeError as exc:
            outcomes[name] = str(exc)
    return outcomes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--local_rank", type=int, default=0)  # the DeepSpeed launcher's; LOCAL_RANK says the same
    args = parser.parse_args()
    rank, _, _ = init_distributed()
    pretrain = stage("pretrain", train={"vision": True, "connector": True, "llm": "frozen"},
                     optimizer={"lr": 1e-2})
    instruct = stage("instruct", train={"vision": False, "connector": False, "llm": "lora"},
                     lora={"roles": ["self_attn", "ffn"], "r": 4, "alpha": 8}, optimizer={"lr": 1e-2})
    record = {}
    for family in FAMILIES:
        config = family_config(family)
        module = f"transformers.models.{family}.modeling_{family}"
        state = None
        if rank == 0:  # as the trainer's initial_state: a plain build, so rank 0 imports the classes first
            torch.manual_seed(0)
            state = VisionLanguageModel.from_config(config).state_dict()
        batch = fixed_batch(config)
        imported_before = module in sys.modules
        first, engine = train(config, pretrain, state, rank, batch, steps=2)
        first_attributes = attention_attributes(engine)
        state = gathered_state_dict(engine.module, rank)
        second, engine = train(config, instruct, state if rank == 0 else None, rank, batch, steps=2)
        record[family] = {"imported_before_first_build": imported_before, "first": first, "second": second,
                          "attention_attributes": [first_attributes, attention_attributes(engine)]}
    record["guard"] = guard_outcomes(family_config(FAMILIES[0]), pretrain)
    Path(args.out, f"rank-{rank}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
