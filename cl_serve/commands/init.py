"""`cl-serve init`: create a store (backbone, method, head), optionally with a release policy."""
from __future__ import annotations

import argparse
import json
from typing import Any

from cl_serve.commands.common import Command, policy_args, print_policy, store_arg
from cl_serve.contract.head_settings import HEAD_NAMES as HEADS  # the one list of names: the contract's
from cl_serve.contract.method_settings import METHOD_NAMES as METHODS
from cl_serve.base.errors import UserError


def _rank_schedule(text: str) -> list[dict[str, int]]:
    try:
        return [{"from_task": int(a), "rank": int(b)} for a, b in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError("expected FROM_TASK:RANK[,FROM_TASK:RANK...], e.g. 1:10,5:8,9:6") from None


def method_dict(a: argparse.Namespace) -> dict[str, Any]:
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


def head_dict(a: argparse.Namespace) -> dict[str, Any]:
    d: dict[str, Any] = {"name": a.head}
    for key in ("covariance", "cov_rank", "projection"):
        if getattr(a, key) is not None:
            d[key] = getattr(a, key)
    return d


def _init_parser(sub) -> None:
    p = sub.add_parser("init", help="create a model store: backbone + continual-learning method")
    store_arg(p)
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
    policy_args(p)


def _init(a: argparse.Namespace) -> int:
    from cl_serve.workflow import pipeline

    cfg = pipeline.init_store(a.store, method=method_dict(a), head=head_dict(a), backbone=a.backbone,
                              checkpoint=a.checkpoint, pretrained=a.pretrained, timm_kwargs=a.timm_kwargs,
                              seed=a.seed)
    print(f"created store {a.store}: {cfg.backbone.timm_model} ({cfg.backbone.source}), "
          f"method {cfg.method.name}, head {cfg.head.name}, input {cfg.preprocessing.input_size}px")
    if a.gate_data or a.max_drop is not None or a.min_new_accuracy is not None:
        print_policy(pipeline.set_policy(a.store, gate_data=a.gate_data, max_drop=a.max_drop,
                                          min_new_accuracy=a.min_new_accuracy))
    return 0


COMMANDS = [Command("init", _init_parser, _init)]
