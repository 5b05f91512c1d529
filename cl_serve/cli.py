"""`cl-serve` command line: init, add-task, evaluate, status, export, policy, promote, rollback, serve, classify,
demo, bench.

Exit code 0 on success, 2 on bad input (the reason on stderr, one line), 3 when add-task published a candidate
the release gate refused, 1 on an unexpected failure.
Each command is one handler in `cl_serve.commands`; this module builds the parser from them, takes the store's
lock for the commands that write, and turns user errors into exit code 2. Heavy imports (torch, ray) happen
inside the handlers that need them, so `cl-serve --help` is instant and a serving image never loads the trainer.
"""
from __future__ import annotations

import argparse
import sys

from cl_serve.commands import all_commands


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cl-serve", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run `cl-serve COMMAND --help` for each command's options.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in all_commands():
        command.add_parser(sub)
    return ap


def run(a: argparse.Namespace) -> int:
    """Writers take the store lock first, before torch is imported: a second writer is refused at once."""
    from cl_serve.store.model_store import LOCK_HINTS

    handler = {c.name: c.run for c in all_commands()}[a.command]
    if a.command not in LOCK_HINTS:
        return handler(a)
    from cl_serve.store.open_store import open_store

    store = open_store(a.store)
    store.config()  # a missing or broken store is reported before anything else
    with store.lock(wait=getattr(a, "wait", False), hint=LOCK_HINTS[a.command]):
        a.store = store  # the handler and the steps it runs use this opened, locked store (never a second lock)
        return handler(a)


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from cl_serve.base.errors import UserError

    try:
        return run(a)
    except UserError as e:  # the trainer's DataError and BackboneError are UserErrors too
        print(f"cl-serve {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
