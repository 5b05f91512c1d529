"""What every command shares: the --store and release-policy arguments, printing."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from typing import Any, Callable

DEFAULT_STORE = os.environ.get("CL_SERVE_STORE", "./cl-store")


@dataclass(frozen=True)
class Command:
    """One `cl-serve` command: its name, how it adds its sub-parser, and its handler (returns the exit code)."""

    name: str
    add_parser: Callable[[Any], None]
    run: Callable[[argparse.Namespace], int]


def store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=DEFAULT_STORE,
                   help="model store directory (default: $CL_SERVE_STORE, else ./cl-store; now %(default)s)")


def policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gate-data", metavar="DIR", help="release gate: ImageFolder of held-out images of old and new "
                   "classes; a new version goes live only if it passes (else it is published as a candidate)")
    p.add_argument("--max-drop", type=float, help="gate: largest accuracy drop allowed on any earlier task, "
                   "against the parent (default 0.05)")
    p.add_argument("--min-new-accuracy", type=float, help="gate: accuracy the new task must reach (default 0)")


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def print_policy(policy) -> None:
    if not policy.gate_data:
        print("release gate: off (every published version goes live)")
    else:
        print(f"release gate: on, gate data {policy.gate_data}; a new version goes live if no earlier task drops "
              f"more than {policy.max_drop:.3f} and the new task reaches {policy.min_new_accuracy:.3f}")
