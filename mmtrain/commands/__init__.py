"""Subcommands of the `mmtrain` CLI.

Every module in this package that defines ``register(subparsers)`` adds its own subcommand(s); `cli.py` discovers them,
so each command lives beside nothing but its own argument parsing and calls into the package for the work. A command
imports that work inside its `run` function, so `mmtrain --help` and argument errors come back without loading torch.
"""
