"""Training-side subcommands: data generate, features extract, train, evaluate, serve."""

from __future__ import annotations

import argparse


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Register the training-side subcommands on the main parser."""
