"""`mmtrain model summary --preset NAME [--gpus N]`: per-part parameter counts from configs alone, and ZeRO-3 memory."""

from __future__ import annotations

import argparse

from mmtrain.errors import UserError


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return str(int(n))


def summary(args: argparse.Namespace) -> int:
    from mmtrain.model.presets import PUBLISHED, summarize

    if args.gpus < 1:
        raise UserError(f"--gpus must be >= 1, got {args.gpus}")
    s = summarize(args.preset)
    c = s.config
    print(f"preset {s.name}: connector {c.connector}, {c.num_image_slots()} image slots per image "
          f"(vision {c.vision_config['model_type']}, llm {c.text_config['model_type']}); built on the meta device")
    print(f"{'part':<10} {'parameters':>15} {'':>10}  published")
    for part in ("vision", "connector", "llm", "total"):
        ref = PUBLISHED.get(part) if s.name != "tiny" else None
        note = f"{ref[0]} ~{_human(ref[1])} ({(s.counts[part] / ref[1] - 1) * 100:+.2f} %)" if ref else ""
        print(f"{part:<10} {s.counts[part]:>15,} {_human(s.counts[part]):>10}  {note}")
    gib = 2**30
    print(f"ZeRO-3 model states per GPU on {args.gpus} GPU(s) (DeepSpeed estimate, Adam, bf16, no offload; activations extra):")
    print(f"  everything trains:        {s.zero3_bytes_per_gpu(args.gpus) / gib:8.2f} GiB")
    print(f"  connector only (stage 1): {s.zero3_bytes_per_gpu(args.gpus, s.counts['connector']) / gib:8.2f} GiB")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("model", help="inspect model presets")
    sub = parser.add_subparsers(dest="model_command", metavar="ACTION")
    p = sub.add_parser("summary", help="per-part parameter counts and ZeRO-3 memory, from configs alone")
    p.add_argument("--preset", required=True, help="tiny, owl-7b, mmgpt-9b, pum-7b, llava-7b")
    p.add_argument("--gpus", type=int, default=8, help="GPUs for the ZeRO-3 per-GPU estimate (default 8)")
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
    p.set_defaults(func=summary)
