"""The `cl-serve` commands, one handler each, grouped by what they act on. `cl_serve.cli` builds the parser from
`all_commands()` and dispatches to the handler of the command given (after taking the store's lock for writers)."""
from __future__ import annotations

from cl_serve.commands.common import Command


def all_commands() -> list[Command]:
    """Every command, in the order `cl-serve --help` lists them."""
    from cl_serve.commands import add_task, init, inspect, serving, tools, versions

    return [c for m in (init, add_task, inspect, versions, serving, tools) for c in m.COMMANDS]
