"""`mmtrain generate`: one prompt with images, or a JSONL file of requests, answered by a model directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmtrain.errors import UserError


def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--model", required=True, help="model directory (mmtrain export, or a run's stages/NAME)")
    parser.add_argument("--template", help="chat template (default: the one recorded with the model, else owl)")
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None, help="sampling seed")
    parser.add_argument("--device", default=None, help="cpu, cuda … (default: cuda when available)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="answer a prompt (with images) or a JSONL of requests")
    add_sampling_args(parser, 128)
    parser.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    parser.add_argument("--prompt", default=None, help="the question; images go before it unless it has <image>")
    parser.add_argument("--requests", default=None, help='JSONL, one {"prompt": ..., "images": [...]} per line')
    parser.add_argument("--out", default=None, help="with --requests: JSONL of the requests with an \"answer\"")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.set_defaults(func=run_generate)


def check_sampling(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be ≥ 1")
    if args.temperature < 0 or not 0 < args.top_p <= 1 or args.top_k < 0:
        raise UserError("--temperature must be ≥ 0, --top-p in (0, 1], --top-k ≥ 0")


def run_generate(args: argparse.Namespace) -> int:
    from mmtrain.eval.chat import read_requests, request_prompt
    from mmtrain.eval.generate import Generator, load_model

    check_sampling(args)
    if (args.prompt is None) == (args.requests is None):
        raise UserError("give either --prompt (with --image …) or --requests FILE --out FILE")
    if args.requests and (args.image or not args.out):
        raise UserError("--requests needs --out FILE and takes images from the file, not --image")
    requests = read_requests(args.requests) if args.requests else [{"prompt": args.prompt, "images": args.image}]
    gen = Generator(load_model(args.model, args.template, args.device))
    prompts = [request_prompt(gen, r["prompt"], r["images"]) for r in requests]
    answers = gen.generate(prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                           top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size)
    if not args.requests:
        print(answers[0])
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as fh:
        for request, answer in zip(requests, answers):
            fh.write(json.dumps({**request, "answer": answer}, ensure_ascii=False) + "\n")
    print(f"{len(answers)} answers → {out}")
    return 0
