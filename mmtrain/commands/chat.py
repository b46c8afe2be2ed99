"""`mmtrain chat`: multi-turn chat with a model directory on stdin (`/image PATH`, `/reset`, `/quit`)."""

from __future__ import annotations

import argparse
import sys

from mmtrain.commands.generate import add_sampling_args, check_sampling


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="multi-turn chat from stdin; /image PATH attaches an image")
    add_sampling_args(parser, 128)
    parser.set_defaults(func=run_chat_command)


def run_chat_command(args: argparse.Namespace) -> int:
    from mmtrain.eval.chat import ChatSession, run_chat
    from mmtrain.eval.generate import Generator, load_model

    check_sampling(args)
    gen = Generator(load_model(args.model, args.template, args.device))
    session = ChatSession(gen, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                          top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    run_chat(session, sys.stdin, sys.stdout, prompt_marker="> " if sys.stdin.isatty() else "")
    return 0
