"""`cl-serve` command line: init, add-task, evaluate, status, export, policy, promote, rollback, serve, classify,
demo, bench.

Exit code 0 on success, 2 on bad input (the reason on stderr, one line), 3 when add-task published a candidate
the release gate refused, 1 on an unexpected failure.
Heavy imports (torch, ray) happen inside the commands that need them, so `cl-serve --help` is instant and a
serving image never loads the trainer.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from cl_serve.demo import PRETRAIN_STEPS
from cl_serve.errors import UserError

DEFAULT_STORE = os.environ.get("CL_SERVE_STORE", "./cl-store")
METHODS = ("inflora", "sdlora", "sdlora-rr", "sdlora-kd", "seq-lora", "none", "auto")
HEADS = ("task-local", "aligned", "analytic")


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--store", default=DEFAULT_STORE,
                   help="model store directory (default: $CL_SERVE_STORE, else ./cl-store; now %(default)s)")


def _policy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gate-data", metavar="DIR", help="release gate: ImageFolder of held-out images of old and new "
                   "classes; a new version goes live only if it passes (else it is published as a candidate)")
    p.add_argument("--max-drop", type=float, help="gate: largest accuracy drop allowed on any earlier task, "
                   "against the parent (default 0.05)")
    p.add_argument("--min-new-accuracy", type=float, help="gate: accuracy the new task must reach (default 0)")


def _rank_schedule(text: str) -> list[dict[str, int]]:
    try:
        return [{"from_task": int(a), "rank": int(b)} for a, b in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError("expected FROM_TASK:RANK[,FROM_TASK:RANK...], e.g. 1:10,5:8,9:6") from None


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cl-serve", description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Run `cl-serve COMMAND --help` for each command's options.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("init", help="create a model store: backbone + continual-learning method")
    _store_arg(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--backbone", metavar="TIMM_NAME", help="a timm ViT name, e.g. vit_base_patch16_224")
    src.add_argument("--checkpoint", metavar="FILE", help=".safetensors backbone, a path or a URL (card.json beside it or "
                     "safetensors metadata give timm_model and timm_kwargs)")
    p.add_argument("--pretrained", action="store_true", help="with --backbone: download timm's pretrained weights "
                   "(needs internet); without it the backbone is randomly initialised")
    p.add_argument("--timm-kwargs", type=json.loads, default=None, metavar="JSON",
                   help='extra timm.create_model arguments with --backbone, e.g. \'{"img_size": 32}\'')
    p.add_argument("--seed", type=int, default=0, help="with --backbone and no --pretrained: the seed of the random "
                   "initialisation (recorded in store.json; default 0, so the same weights every time)")
    p.add_argument("--method", choices=METHODS, default="inflora", help="continual-learning method (default inflora); "
                   "auto: on the first task, keep the --adapter only if it beats the frozen backbone on held-out "
                   "images (and pick the analytic head's width from --projections)")
    p.add_argument("--adapter", choices=[m for m in METHODS if m not in ("none", "auto")], default="inflora",
                   help="with --method auto: the adapter tried against the frozen backbone (default inflora; the "
                        "adapter flags below configure it, --adapt-tasks defaults to 1 there)")
    p.add_argument("--projections", type=lambda t: [int(x) for x in t.split(",")], metavar="M,M,...",
                   help="with --method auto and the analytic head: widths to choose from (default 0,2048,5000)")
    p.add_argument("--rank", type=int, help="rank of each task's branch (default 10)")
    p.add_argument("--targets", help="comma-separated adapted projections: q,k,v,proj,fc1,fc2 "
                   "(default k,v for InfLoRA, q,v for SD-LoRA)")
    p.add_argument("--eps0", type=float, help="InfLoRA: DualGPM threshold at task 1 (default 0.95)")
    p.add_argument("--expected-tasks", type=int, help="InfLoRA: T of the threshold schedule (default 10)")
    p.add_argument("--rank-schedule", type=_rank_schedule, help="SD-LoRA-RR: FROM_TASK:RANK,... (default 1:10,5:8,9:6)")
    p.add_argument("--kd-tau", type=float, help="SD-LoRA-KD: residual threshold for folding (default 9e-4)")
    p.add_argument("--blocks", type=int, help="adapt only the last N transformer blocks (default: all); the frozen "
                   "blocks before them run once per image view, so training costs about N/depth of a full step")
    p.add_argument("--adapt-tasks", type=int, help="learn branches during the first N tasks only, then keep the "
                   "backbone fixed (first-session adaptation: no feature drift under the head's statistics)")
    p.add_argument("--alpha-init", type=float, help="SD-LoRA: initial magnitude of a new direction (default 1)")
    p.add_argument("--magnitudes", choices=("per-layer", "per-task"), default="per-task",
                   help="SD-LoRA: one magnitude per task shared by all layers (default, as the official code; the "
                        "better one in the CIL benchmark) or one per (layer, target)")
    p.add_argument("--head", choices=HEADS, default="analytic",
                   help="classifier head (default analytic: RanPAC ridge over random features, best in the CIL "
                        "benchmark); aligned (classifier alignment from stored class Gaussians); task-local (one "
                        "block per task, the papers' default, forgets most)")
    p.add_argument("--cov", dest="covariance", choices=("full", "lowrank"),
                   help="aligned head: class covariance form (default lowrank)")
    p.add_argument("--cov-rank", type=int, help="aligned head: rank of the low-rank covariance (default 16)")
    p.add_argument("--projection", type=int, help="analytic head: random projection width M, 0 = plain ridge")
    _policy_args(p)

    p = sub.add_parser("add-task", help="learn the classes of an ImageFolder directory and publish a new version")
    _store_arg(p)
    p.add_argument("--data", required=True, metavar="DIR", help="ImageFolder: one sub-folder of images per new class "
                   "(a path, or a URL such as s3://bucket/incoming/week-47: copied to a local cache first)")
    p.add_argument("--test-data", metavar="DIR", help="ImageFolder of known classes to report accuracy on")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam",
                   help="adam (InfLoRA's recipe) or sgd with momentum 0.9 (SD-LoRA's: --lr 8e-3 --schedule constant)")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="autocast of the training forward (bf16 is faster on CPUs and GPUs with bf16 units)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--views", type=int, default=4, help="with --blocks: augmented views per image cached for "
                   "training (each step draws one per image)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--workers", type=int, default=1, help="train on N Ray Train workers (DDP-style; inside a Ray "
                   "cluster, e.g. a RayJob, its nodes; else a local Ray)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray Train worker")
    p.add_argument("--strict", action="store_true", help="any corrupt image is an error (default: skip and report)")
    p.add_argument("--wait", action="store_true", help="wait for another writer instead of failing at once")
    p.add_argument("--no-export", action="store_true", help="skip ONNX export (such a version cannot be served)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser("evaluate", help="accuracy of a version on an ImageFolder of known classes")
    _store_arg(p)
    p.add_argument("--data", required=True, metavar="DIR")
    p.add_argument("--version", type=int, help="default: the live version")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("status", help="versions (verified), what a server would serve, method and backbone; "
                       "exit 2 when the live version or CURRENT is broken")
    _store_arg(p)
    p.add_argument("--fast", action="store_true", help="read the manifests only; do not verify file hashes")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("export", help="re-export a version's merged weights to ONNX (parity-checked)")
    _store_arg(p)
    p.add_argument("--version", type=int, help="default: the live version")
    p.add_argument("--fp16", action="store_true", help="attach a half-precision ONNX file for GPUs (served in "
                   "preference to the fp32 one on a CUDA provider)")
    p.add_argument("--opset", type=int, choices=range(17, 22), metavar="{17..21}",
                   help="ONNX opset (default 18); the version's file is replaced atomically, never in place")

    p = sub.add_parser("policy", help="show or change the release gate: when a new version may go live by itself")
    _store_arg(p)
    _policy_args(p)
    p.add_argument("--off", action="store_true", help="no gate: every published version goes live")
    p.add_argument("--json", action="store_true")

    p = sub.add_parser("promote", help="make a version live by hand (e.g. a candidate the release gate refused)")
    _store_arg(p)
    p.add_argument("version", type=int)
    p.add_argument("--wait", action="store_true")

    p = sub.add_parser("rollback", help="make an earlier version live again (servers swap to it)")
    _store_arg(p)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--wait", action="store_true")

    p = sub.add_parser("serve", help="serve the live version over HTTP with Ray Serve; hot-swaps new versions")
    _store_arg(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    p.add_argument("--poll-interval", type=float, default=1.0, help="seconds between checks of the store's CURRENT")
    p.add_argument("--max-request-mb", type=float, default=20.0)
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs for the local Ray instance")
    p.add_argument("--gpus-per-replica", type=float, default=0.0,
                   help="GPUs each replica requests (fractions share a GPU); on CUDA the fp16 ONNX file is preferred")
    p.add_argument("--max-queued-requests", type=int, default=64,
                   help="requests one replica holds at once; beyond, 503 with Retry-After")
    p.add_argument("--request-timeout", type=float, default=30.0, help="seconds per request before a 503")
    p.add_argument("--canary", type=float, default=0.0, metavar="P", help="send P%% of requests (those without "
                   "?version) to the newest candidate the release gate refused; responses say canary: true")
    p.add_argument("--metrics-port", type=int, default=8080, help="Ray's Prometheus endpoint on 127.0.0.1")
    p.add_argument("--auth-token", default=None, metavar="TOKEN",
                   help="require `Authorization: Bearer TOKEN` on every route but /healthz "
                        "(default: $CL_SERVE_AUTH_TOKEN; unset = no token). Prefer the variable: argv is visible to ps")

    p = sub.add_parser("classify", help="send images to a running server and print its predictions")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--top-k", type=int, default=3)

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

    p = sub.add_parser("bench", help="benchmarks: `cl-serve bench cil ...` or `cl-serve bench serving ...`")
    p.add_argument("which", choices=("cil", "serving", "hostile"))
    p.add_argument("args", nargs=argparse.REMAINDER)
    return ap


def _method_dict(a: argparse.Namespace) -> dict[str, Any]:
    if a.method == "auto":
        candidate = _adapter_dict(a, a.adapter)
        candidate.setdefault("adapt_tasks", 1)
        return {"name": "auto", "candidate": candidate,
                **({"projections": a.projections} if a.projections else {})}
    if a.projections:
        raise UserError("--projections chooses among widths with --method auto; use --projection M otherwise")
    return _adapter_dict(a, a.method)


def _adapter_dict(a: argparse.Namespace, name: str) -> dict[str, Any]:
    d: dict[str, Any] = {"name": name}
    for key in ("rank", "eps0", "expected_tasks", "kd_tau", "alpha_init", "rank_schedule", "blocks", "adapt_tasks"):
        if getattr(a, key) is not None:
            d[key] = getattr(a, key)
    if name.startswith("sdlora"):
        d["magnitudes"] = a.magnitudes
    if a.targets:
        d["targets"] = [t.strip() for t in a.targets.split(",") if t.strip()]
    return d


def _head_dict(a: argparse.Namespace) -> dict[str, Any]:
    d: dict[str, Any] = {"name": a.head}
    for key in ("covariance", "cov_rank", "projection"):
        if getattr(a, key) is not None:
            d[key] = getattr(a, key)
    return d


def _print_status(r: dict[str, Any]) -> None:
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
        if v["candidate"]:
            mark = "c"
        acc = f"test acc {v['test_accuracy']:.3f}" if v["test_accuracy"] is not None else ""
        onnx = "" if v["onnx"] else "  (no ONNX: not servable)"
        gate = "" if v["gate"] is None else ("  gate passed" if v["gate"]["passed"] else
                                             "  gate REFUSED: " + "; ".join(v["gate"]["reasons"]))
        print(f"  {mark} {v['version']:4d}  task {v['task']}  +{v['new_classes']} -> {v['classes']} classes  "
              f"{v['created_at']}  {acc}{onnx}{gate}")
    print("  (* live, c candidate: published, refused by the release gate, not live)")


def _print_policy(policy) -> None:
    if not policy.gate_data:
        print("release gate: off (every published version goes live)")
    else:
        print(f"release gate: on, gate data {policy.gate_data}; a new version goes live if no earlier task drops "
              f"more than {policy.max_drop:.3f} and the new task reaches {policy.min_new_accuracy:.3f}")


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def run(a: argparse.Namespace) -> int:
    """Writers take the store lock first, before torch is imported: a second writer is refused at once."""
    from cl_serve.store import LOCK_HINTS
    from cl_serve.open_store import open_store

    if a.command not in LOCK_HINTS:
        return _run(a)
    store = open_store(a.store)
    store.config()  # a missing or broken store is reported before anything else
    with store.lock(wait=getattr(a, "wait", False), hint=LOCK_HINTS[a.command]):
        return _run(a)


def _run(a: argparse.Namespace) -> int:
    if a.command in ("init", "add-task", "evaluate", "export", "rollback", "status", "policy", "promote"):
        from cl_serve import pipeline

    if a.command == "init":
        cfg = pipeline.init_store(a.store, method=_method_dict(a), head=_head_dict(a), backbone=a.backbone,
                                  checkpoint=a.checkpoint, pretrained=a.pretrained, timm_kwargs=a.timm_kwargs,
                                  seed=a.seed)
        print(f"created store {a.store}: {cfg.backbone['timm_model']} ({cfg.backbone['source']}), "
              f"method {cfg.method['name']}, head {cfg.head['name']}, input {cfg.preprocessing.input_size}px")
        if a.gate_data or a.max_drop is not None or a.min_new_accuracy is not None:
            _print_policy(pipeline.set_policy(a.store, gate_data=a.gate_data, max_drop=a.max_drop,
                                              min_new_accuracy=a.min_new_accuracy))
    elif a.command == "add-task":
        from cl_serve.trainer.train import TrainConfig
        from pydantic import ValidationError
        from cl_serve.errors import UserError

        try:
            tc = TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, weight_decay=a.weight_decay,
                             optimizer=a.optimizer, schedule=a.schedule, precision=a.precision,
                             seed=a.seed, device=a.device, views=a.views)
        except ValidationError as e:
            raise UserError(f"invalid training settings: {pipeline._validation_message(e)}") from None
        log = (lambda s: None) if a.json else (lambda s: print(s, file=sys.stderr))
        if a.workers < 1 or a.gpus_per_worker < 0:
            raise UserError("--workers must be >= 1 and --gpus-per-worker >= 0")
        r = pipeline.add_task(a.store, a.data, tc, test_data=a.test_data, strict=a.strict, wait=a.wait,
                              export=not a.no_export, progress=not a.json, log=log, workers=a.workers,
                              gpus_per_worker=a.gpus_per_worker)
        if a.json:
            _print_json(r)
        else:
            print(f"published version {r['version']} (parent {r['parent']}): task {r['task']}, "
                  f"+{len(r['classes_added'])} classes ({', '.join(r['classes_added'][:8])}"
                  f"{', ...' if len(r['classes_added']) > 8 else ''}), {r['total_classes']} in all; "
                  f"{r['train_seconds']:.1f}s training on {r['device']}, {r['seconds']:.1f}s total")
            print(f"  train accuracy {r['metrics']['train_accuracy']:.3f}; method: {json.dumps(r['method_summary'])[:300]}"
                  f"; head: {json.dumps(r['head_summary'])[:200]}")
            if r["auto"]:
                c = r["auto"]["chosen"]
                print(f"  method auto chose {c['method']}" + (f" with M = {c['projection']}" if c["projection"] is not None
                                                             else "")
                      + f": held-out accuracy adapter ({r['auto']['candidate']['name']}) "
                        f"{c['adapter_held_out_accuracy']:.3f}, frozen {c['frozen_held_out_accuracy']:.3f} on "
                        f"{r['auto']['held_out_images']} images (margin {r['auto']['margin']:g}; in the manifest)")
            if r["onnx"]:
                print(f"  model.onnx parity max |diff| {r['onnx']['parity_max_abs_diff']:.2e}")
            if "test" in r["metrics"]:
                t = r["metrics"]["test"]
                per = ", ".join(f"task {p['task']}: {p['accuracy']:.3f}" for p in t["per_task"])
                print(f"  test accuracy {t['accuracy']:.3f} on {t['images']} images ({per})")
            if r["gate"] is not None:
                g = r["gate"]
                per = ", ".join(f"task {row['task']}: {row['accuracy']:.3f}" + (
                    f" (parent {row['parent_accuracy']:.3f})" if "parent_accuracy" in row else "")
                    for row in g["tasks"] if row["accuracy"] is not None)
                print(f"  release gate {'passed' if g['passed'] else 'REFUSED'}: {per}")
        if r["gate"] is not None and not r["gate"]["passed"]:
            from cl_serve.release_gate import GATE_REFUSED_EXIT

            print(f"cl-serve add-task: version {r['version']} is a candidate, not live: "
                  + "; ".join(r["gate"]["reasons"]) + f". Make it live with `cl-serve promote {r['version']}`",
                  file=sys.stderr)
            return GATE_REFUSED_EXIT
    elif a.command == "evaluate":
        r = pipeline.evaluate(a.store, a.data, a.version)
        if a.json:
            _print_json(r)
        else:
            print(f"version {r['version']}: accuracy {r['accuracy']:.4f} on {r['images']} images")
            for p in r["per_task"]:
                print(f"  task {p['task']}: {p['accuracy']:.4f} ({p['images']} images)")
    elif a.command == "status":
        r = pipeline.status(a.store, fast=a.fast)
        if a.json:
            _print_json(r)
        else:
            _print_status(r)
        if not r["healthy"]:
            print(f"cl-serve status: error: {r['current_error'] or r['serving']['reason']}", file=sys.stderr)
            return 2
    elif a.command == "export":
        r = pipeline.export_version(a.store, a.version, fp16=a.fp16, opset=a.opset)
        print(f"exported version {r['version']} to {r['file']} (opset {r['opset']}, {r['dtype']}, "
              f"parity {r['parity_max_abs_diff']:.2e})")
    elif a.command == "policy":
        if a.off or a.gate_data or a.max_drop is not None or a.min_new_accuracy is not None:
            policy = pipeline.set_policy(a.store, gate_data=a.gate_data, max_drop=a.max_drop,
                                         min_new_accuracy=a.min_new_accuracy, off=a.off)
        else:
            from cl_serve.open_store import open_store

            policy = open_store(a.store).policy()
        _print_json(policy.model_dump()) if a.json else _print_policy(policy)
    elif a.command == "promote":
        r = pipeline.promote(a.store, a.version, wait=a.wait)
        note = "" if r["gate"] is None or r["gate"]["passed"] else \
            f" (promoted by hand; the gate had said: {'; '.join(r['gate']['reasons'])})"
        print(f"version {r['version']} is live{note}")
    elif a.command == "rollback":
        v = pipeline.rollback(a.store, a.version, wait=a.wait)
        print(f"version {v} is live")
    elif a.command == "serve":
        from cl_serve.serve_cli import serve_forever

        serve_forever(a)
    elif a.command == "classify":
        from cl_serve.client import classify_files

        _print_json(classify_files(a.images, a.url, a.top_k))
    elif a.command == "demo":
        from cl_serve.demo import run_demo

        run_demo(a.workdir, method=a.method, head=a.head, pretrain_steps=a.pretrain_steps, serve=not a.no_serve,
                 screenshot=a.screenshot, seed=a.seed)
    elif a.command == "bench":
        import importlib

        mod = importlib.import_module(f"benchmarks.{a.which}")
        return int(mod.main(a.args) or 0)
    return 0


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    from cl_serve.errors import UserError

    user_errors: tuple[type[BaseException], ...] = (UserError,)
    if a.command not in ("serve", "classify"):
        try:
            from cl_serve.trainer.errors import BackboneError, DataError

            user_errors += (DataError, BackboneError)
        except ImportError:
            pass
    try:
        return run(a)
    except user_errors as e:
        print(f"cl-serve {a.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
