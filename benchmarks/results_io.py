"""Where a benchmark's numbers go: the command that gave them, and NAME.json + NAME.md under the results folder."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def command_line(module: str, argv: list[str] | None) -> str:
    """`python -m MODULE ARGS`: what re-runs this measurement."""
    return f"python -m {module} " + " ".join(sys.argv[1:] if argv is None else argv)


def save(out: Path, name: str, result: dict[str, Any], markdown: str) -> None:
    """Write NAME.json and NAME.md under `out` and print the table."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out / f"{name}.md").write_text(markdown)
    print(markdown)
