"""`cl-serve add-task`: learn an ImageFolder's classes on top of the live version and publish a new version."""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from cl_serve.commands.common import Command, print_json, store_arg
from cl_serve.base.errors import UserError

if TYPE_CHECKING:
    from cl_serve.workflow.pipeline import AddTaskResult


def _add_task_parser(sub) -> None:
    p = sub.add_parser("add-task", help="learn the classes of an ImageFolder directory and publish a new version")
    store_arg(p)
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
                   "training (each step draws one per image); only when fewer than --epochs, where they save passes")
    p.add_argument("--cache-max-gib", type=float, default=2.0, help="with --blocks: memory for the frozen blocks' "
                   "cached outputs, evaluation view included; what does not fit is recomputed (default 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--workers", type=int, default=1, help="train on N Ray Train workers (DDP-style; inside a Ray "
                   "cluster, e.g. a RayJob, its nodes; else a local Ray)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="GPUs per Ray Train worker")
    p.add_argument("--strict", action="store_true", help="any corrupt image is an error (default: skip and report)")
    p.add_argument("--wait", action="store_true", help="wait for another writer instead of failing at once")
    p.add_argument("--no-export", action="store_true", help="skip ONNX export (such a version cannot be served)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _train_config(a: argparse.Namespace):
    from pydantic import ValidationError

    from cl_serve.contract.store_schema import describe_error
    from cl_serve.trainer.train import TrainConfig

    try:
        return TrainConfig(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, weight_decay=a.weight_decay,
                           optimizer=a.optimizer, schedule=a.schedule, precision=a.precision,
                           seed=a.seed, device=a.device, views=a.views, cache_max_gib=a.cache_max_gib)
    except ValidationError as e:
        raise UserError(f"invalid training settings: {describe_error(e, limit=None)}") from None


def _add_task(a: argparse.Namespace) -> int:
    from cl_serve.workflow import pipeline

    tc = _train_config(a)
    if a.workers < 1 or a.gpus_per_worker < 0:
        raise UserError("--workers must be >= 1 and --gpus-per-worker >= 0")
    log = (lambda s: None) if a.json else (lambda s: print(s, file=sys.stderr))
    r = pipeline.add_task(a.store, a.data, tc, test_data=a.test_data, strict=a.strict, wait=a.wait,
                          export=not a.no_export, progress=not a.json, log=log, workers=a.workers,
                          gpus_per_worker=a.gpus_per_worker)
    print_json(r.model_dump()) if a.json else print_summary(r)
    if r.gate is not None and not r.gate.passed:
        from cl_serve.workflow.release_gate import GATE_REFUSED_EXIT

        print(f"cl-serve add-task: version {r.version} is a candidate, not live: "
              + "; ".join(r.gate.reasons) + f". Make it live with `cl-serve promote {r.version}`",
              file=sys.stderr)
        return GATE_REFUSED_EXIT
    return 0


def print_summary(r: "AddTaskResult") -> None:
    print(f"published version {r.version} (parent {r.parent}): task {r.task}, "
          f"+{len(r.classes_added)} classes ({', '.join(r.classes_added[:8])}"
          f"{', ...' if len(r.classes_added) > 8 else ''}), {r.total_classes} in all; "
          f"{r.train_seconds:.1f}s training on {r.device}, {r.seconds:.1f}s total")
    print(f"  train accuracy {r.metrics.train_accuracy:.3f}; method: {json.dumps(r.method_summary)[:300]}"
          f"; head: {json.dumps(r.head_summary)[:200]}")
    if r.auto:
        c = r.auto["chosen"]
        print(f"  method auto chose {c['method']}" + (f" with M = {c['projection']}" if c["projection"] is not None
                                                     else "")
              + f": held-out accuracy adapter ({r.auto['candidate']['name']}) "
                f"{c['adapter_held_out_accuracy']:.3f}, frozen {c['frozen_held_out_accuracy']:.3f} on "
                f"{r.auto['held_out_images']} images (margin {r.auto['margin']:g}; in the manifest)")
    if r.onnx:
        o = r.onnx
        line = f"  model.onnx parity max |diff| {o.parity_max_abs_diff:.2e}"
        if o.parity_onnx_fp64_error is not None:
            line += (f" (above 1e-4 x largest |logit|; against float64 ONNX Runtime {o.parity_onnx_fp64_error:.2e}, "
                     f"torch fp32 {o.parity_torch_fp32_error:.2e})")
        print(line)
    if r.metrics.test is not None:
        t = r.metrics.test
        per = ", ".join(f"task {p.task}: {p.accuracy:.3f}" for p in t.per_task)
        print(f"  test accuracy {t.accuracy:.3f} on {t.images} images ({per})")
    if r.gate is not None:
        g = r.gate
        per = ", ".join(f"task {row.task}: {row.accuracy:.3f}" + (
            f" (parent {row.parent_accuracy:.3f})" if row.parent_accuracy is not None else "")
            for row in g.tasks if row.accuracy is not None)
        print(f"  release gate {'passed' if g.passed else 'REFUSED'}: {per}")

COMMANDS = [Command("add-task", _add_task_parser, _add_task)]
