"""Regenerate requirements.lock from the virtual environment, keeping the serving image's pins.

`pip freeze` of .venv lists what `make test` installed, which is not everything an image installs: on Linux x86_64
the venv has onnxruntime-gpu while the serving image (deploy/requirements-serve.txt) installs the CPU onnxruntime.
A package the serving image names that the venv lacks keeps its pin from the current lock; if the lock has none, this
fails and says which. Usage (what `make lock` runs): python tools/lock.py .venv/bin/python
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER_LINES = 3


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lines: list[str]) -> dict[str, str]:
    """canonical name -> the whole `name==version` line, for every pin among `lines`."""
    out = {}
    for line in lines:
        line = line.strip()
        if line and not line.startswith(("#", "-e")) and "==" in line:
            out[canonical(line.split("==")[0])] = line
    return out


def serve_names(text: str) -> list[str]:
    """Package names the serving image installs (extras and versions stripped)."""
    names = []
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line:
            names.append(canonical(re.split(r"[\[=<>!~ ;]", line, maxsplit=1)[0]))
    return names


def merged_lock(old_lock: str, frozen: list[str], serve_requirements: str) -> str:
    """The new lock text: the old header, the frozen pins, and the serving image's pins the freeze lacks."""
    new = {k: v for k, v in pins(frozen).items() if k != "cl-serve"}
    old = pins(old_lock.splitlines())
    missing = []
    for name in serve_names(serve_requirements):
        if name not in new:
            if name not in old:
                missing.append(name)
            else:
                new[name] = old[name]
    if missing:
        raise SystemExit(f"the serving image needs {missing}, which neither the venv nor the old lock pins: "
                         "install them into the venv or pin them by hand first")
    header = old_lock.splitlines()[:HEADER_LINES]
    return "\n".join(header + sorted(new.values(), key=str.lower)) + "\n"


def main(argv: list[str]) -> int:
    python = argv[0] if argv else sys.executable
    frozen = subprocess.run([python, "-m", "pip", "freeze", "--exclude-editable"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    lock = ROOT / "requirements.lock"
    text = merged_lock(lock.read_text(), frozen, (ROOT / "deploy" / "requirements-serve.txt").read_text())
    tmp = lock.with_suffix(".lock.new")
    tmp.write_text(text)
    tmp.replace(lock)
    print(f"wrote {lock} ({len(pins(text.splitlines()))} pins)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
