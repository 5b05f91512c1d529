"""`cl-serve evaluate` and `cl-serve status`: what a store holds and how well its versions do."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from cl_serve.commands.common import Command, print_json, store_arg


def print_status(r: dict[str, Any]) -> None:
    m = r["method"]
    print(f"store {r['store']}\n  backbone {r['backbone']['timm_model']} {r['backbone'].get('timm_kwargs', {})}"
          f" ({r['backbone']['source']})\n  method {m['name']}: "
          + ", ".join(f"{k}={v}" for k, v in m.items() if k != "name")
          + f"\n  head {r['head']['name']}: " + ", ".join(f"{k}={v}" for k, v in r["head"].items() if k != "name"))
    if r["current_error"]:
        print(f"  CURRENT: {r['current_error']}")
    else:
        print(f"  live version {r['current']}: {r['tasks']} tasks, {r['classes']} classes")
    s = r["serving"]
    print(f"  a server would serve: version {s['version']}" if s["version"] is not None
          else f"  a server would serve: nothing new ({s['reason']})")
    print("  files verified (sha256)" if r["verified"] else "  files NOT verified (--fast): manifests read only")
    for v in r["versions"]:
        mark = "*" if v["live"] else " "
        if v["state"] == "broken":
            print(f"  {mark} {v['version']:4d}  BROKEN: {v['error']}")
            continue
        if v["state"] == "candidate":
            mark = "c"
        acc = f"test acc {v['test_accuracy']:.3f}" if v["test_accuracy"] is not None else ""
        onnx = "" if v["onnx"] else "  (no ONNX: not servable)"
        gate = "" if v["gate"] is None else ("  gate passed" if v["gate"]["passed"] else
                                             "  gate REFUSED: " + "; ".join(v["gate"]["reasons"]))
        print(f"  {mark} {v['version']:4d}  task {v['task']}  +{v['new_classes']} -> {v['classes']} classes  "
              f"{v['created_at']}  {acc}{onnx}{gate}")
    print("  (* live, c candidate: published, refused by the release gate, not live)")


def _evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy of a version on an ImageFolder of known classes")
    store_arg(p)
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--version", type=int, help="default: the live version")
    p.add_argument("--json", action="store_true")


def _evaluate(a: argparse.Namespace) -> int:
    from cl_serve.workflow import pipeline

    r = pipeline.evaluate(a.store, a.data, a.version)
    if a.json:
        print_json(r)
    else:
        print(f"version {r['version']}: accuracy {r['accuracy']:.4f} on {r['images']} images")
        for p in r["per_task"]:
            print(f"  task {p['task']}: {p['accuracy']:.4f} ({p['images']} images)")
    return 0


def _status_parser(sub) -> None:
    p = sub.add_parser("status", help="versions (verified), what a server would serve, method and backbone; "
                       "exit 2 when the live version or CURRENT is broken")
    store_arg(p)
    p.add_argument("--fast", action="store_true", help="read the manifests only; do not verify file hashes")
    p.add_argument("--json", action="store_true")


def _status(a: argparse.Namespace) -> int:
    from cl_serve.workflow import versions

    r = versions.status(a.store, fast=a.fast)
    if a.json:
        print_json(r)
    else:
        print_status(r)
    if not r["healthy"]:
        print(f"cl-serve status: error: {r['current_error'] or r['serving']['reason']}", file=sys.stderr)
        return 2
    return 0


COMMANDS = [Command("evaluate", _evaluate_parser, _evaluate), Command("status", _status_parser, _status)]
