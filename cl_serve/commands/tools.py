"""`cl-serve demo` and `cl-serve bench`: the offline demo and the benchmarks."""
from __future__ import annotations

import argparse

from cl_serve.commands.common import Command
from cl_serve.contract.head_settings import HEAD_NAMES as HEADS
from cl_serve.contract.method_settings import METHOD_NAMES as METHODS
from cl_serve.workflow.demo import PRETRAIN_STEPS


def _demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="offline CPU demo: self-pretrained tiny ViT, three tasks, per-task accuracy")
    p.add_argument("--workdir", default="demo-run")
    p.add_argument("--method", choices=[m for m in METHODS if m != "auto"], default="inflora",
                   help="adapter learned on the first task, compared with the frozen backbone (default inflora; "
                        "none: the frozen backbone only)")
    p.add_argument("--head", choices=HEADS, default="analytic")
    p.add_argument("--pretrain-steps", type=int, default=PRETRAIN_STEPS,
                   help="optimiser steps of the demo backbone's pretraining (bounded by steps, not time)")
    p.add_argument("--no-serve", action="store_true", help="skip the serving part of the demo")
    p.add_argument("--seed", type=int, default=0, help="training seed of the tasks (batch order, augmentation)")
    p.add_argument("--screenshot", metavar="PNG", help="save a picture of the web page classifying an image "
                   "(needs chromium, chromedriver and selenium)")


def _demo(a: argparse.Namespace) -> int:
    from cl_serve.workflow.demo import run_demo

    run_demo(a.workdir, method=a.method, head=a.head, pretrain_steps=a.pretrain_steps, serve=not a.no_serve,
             screenshot=a.screenshot, seed=a.seed)
    return 0


def _bench_parser(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks: `cl-serve bench cil ...` or `cl-serve bench serving ...`")
    p.add_argument("which", choices=("cil", "serving", "hostile"))
    p.add_argument("args", nargs=argparse.REMAINDER)


def _bench(a: argparse.Namespace) -> int:
    """The benchmarks live in the repository's benchmarks/ (not installed with the package): run from its root."""
    import importlib
    import os
    import sys

    from cl_serve.base.errors import UserError

    if os.path.isfile(os.path.join(os.getcwd(), "benchmarks", "cil.py")) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        mod = importlib.import_module(f"benchmarks.{a.which}")
    except ModuleNotFoundError as e:
        if e.name not in ("benchmarks", f"benchmarks.{a.which}"):
            raise
        raise UserError("the benchmarks are not installed with cl-serve: run `cl-serve bench` from the root of a "
                        "source checkout (git clone ...; cd cl-serve)") from None
    return int(mod.main(a.args) or 0)


COMMANDS = [Command("demo", _demo_parser, _demo), Command("bench", _bench_parser, _bench)]
