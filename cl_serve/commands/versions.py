"""`cl-serve export`, `policy`, `promote` and `rollback`: act on the versions a store already holds."""
from __future__ import annotations

import argparse

from cl_serve.commands.common import Command, policy_args, print_json, print_policy, store_arg


def _export_parser(sub) -> None:
    p = sub.add_parser("export", help="re-export a version's merged weights to ONNX (parity-checked)")
    store_arg(p)
    p.add_argument("--version", type=int, help="default: the live version")
    p.add_argument("--fp16", action="store_true", help="attach a half-precision ONNX file for GPUs (served in "
                   "preference to the fp32 one on a CUDA provider)")
    p.add_argument("--opset", type=int, choices=range(17, 22), metavar="{17..21}",
                   help="ONNX opset (default 18); the version's file is replaced atomically, never in place")
    p.add_argument("--int8", action="store_true", help="attach an int8 file for CPUs (serve --precision int8), "
                   "made from the fp32 one and attached only if it agrees with it on held-out images")
    p.add_argument("--gate-data", metavar="DIR", help="--int8: labelled held-out images to judge it on (default: "
                   "the release policy's gate data)")
    p.add_argument("--min-agreement", type=float, default=0.98, metavar="F",
                   help="--int8: smallest share of images with the fp32 file's top-1 class (default 0.98)")
    p.add_argument("--max-drop", type=float, default=None, metavar="F",
                   help="--int8: largest accuracy drop against fp32 (default: the release policy's max_drop)")
    p.add_argument("--safetensors", metavar="PATH", help="instead: write the version's plain (merged) weights to "
                   "PATH, for timm.create_model (versions do not store them; the store is not changed)")


def _export(a: argparse.Namespace) -> int:
    from cl_serve.workflow import pipeline

    if a.safetensors:
        from cl_serve.workflow.plain_weights import save_merged

        r = save_merged(a.store, a.version, a.safetensors)
        print(f"wrote the plain weights of version {r['version']} to {r['file']} ({r['bytes'] / 2**20:.1f} MiB)")
        return 0
    if a.int8:
        from cl_serve.workflow.quantization import quantize_version

        r = quantize_version(a.store, a.version, gate_data=a.gate_data, min_agreement=a.min_agreement,
                             max_drop=a.max_drop, progress=True)
        print(f"attached int8 to version {r['version']}: {r['file']} ({r['bytes'] / 2**20:.1f} MiB, fp32 "
              f"{r['fp32_bytes'] / 2**20:.1f} MiB); top-1 agreement {r['agreement']:.4f}, accuracy "
              f"{r['accuracy_int8']:.4f} vs {r['accuracy_fp32']:.4f} fp32 on {r['images']} images")
        return 0
    r = pipeline.export_version(a.store, a.version, fp16=a.fp16, opset=a.opset)
    print(f"exported version {r['version']} to {r['file']} (opset {r['opset']}, {r['dtype']}, "
          f"parity {r['parity_max_abs_diff']:.2e})")
    return 0


def _policy_parser(sub) -> None:
    p = sub.add_parser("policy", help="show or change the release gate: when a new version may go live by itself")
    store_arg(p)
    policy_args(p)
    p.add_argument("--off", action="store_true", help="no gate: every published version goes live")
    p.add_argument("--json", action="store_true")


def _policy(a: argparse.Namespace) -> int:
    from cl_serve.workflow import versions

    if a.off or a.gate_data or a.max_drop is not None or a.min_new_accuracy is not None:
        policy = versions.set_policy(a.store, gate_data=a.gate_data, max_drop=a.max_drop,
                                     min_new_accuracy=a.min_new_accuracy, off=a.off)
    else:
        from cl_serve.store.open_store import open_store

        policy = open_store(a.store).policy()
    print_json(policy.model_dump()) if a.json else print_policy(policy)
    return 0


def _promote_parser(sub) -> None:
    p = sub.add_parser("promote", help="make a version live by hand (e.g. a candidate the release gate refused)")
    store_arg(p)
    p.add_argument("version", type=int)
    p.add_argument("--wait", action="store_true")


def _promote(a: argparse.Namespace) -> int:
    from cl_serve.workflow import versions

    r = versions.promote(a.store, a.version, wait=a.wait)
    note = "" if r["gate"] is None or r["gate"]["passed"] else \
        f" (promoted by hand; the gate had said: {'; '.join(r['gate']['reasons'])})"
    print(f"version {r['version']} is live{note}")
    return 0


def _rollback_parser(sub) -> None:
    p = sub.add_parser("rollback", help="make an earlier version live again (servers swap to it)")
    store_arg(p)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--wait", action="store_true")


def _rollback(a: argparse.Namespace) -> int:
    from cl_serve.workflow import versions

    v = versions.rollback(a.store, a.version, wait=a.wait)
    print(f"version {v} is live")
    return 0


def _prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="remove old versions (a dry run unless --yes): never the live or the newest one")
    store_arg(p)
    p.add_argument("--keep", type=int, metavar="N", help="keep the N newest versions")
    p.add_argument("--older-than", metavar="DURATION", help="remove only versions created more than this long ago "
                   "(e.g. 90d, 12w, 36h)")
    p.add_argument("--yes", action="store_true", help="remove them (without it: print the plan, change nothing)")
    p.add_argument("--allow-candidate", action="store_true", help="the canary's candidate may go too")
    p.add_argument("--allow-rollback-target", action="store_true", help="the newest rollback target may go too")
    p.add_argument("--wait", action="store_true")
    p.add_argument("--json", action="store_true")


def _prune(a: argparse.Namespace) -> int:
    from cl_serve.workflow import retention

    allow = tuple(n for n, on in (("canary candidate", a.allow_candidate),
                                   ("newest rollback target", a.allow_rollback_target)) if on)
    r = retention.prune(a.store, keep=a.keep, older_than=a.older_than, apply=a.yes, allow=allow, wait=a.wait)
    if a.json:
        print_json(r)
        return 0
    for v, why in sorted(r["kept"].items()):
        print(f"keep   version {v}: {why}")
    verb = "removed" if a.yes else "would remove"
    for v in r["remove"]:
        print(f"{verb} version {v}")
    if a.yes:
        print(f"removed {len(r['removed'])} version(s), {r['bytes_freed'] / 2**20:.1f} MiB freed")
    else:
        print(f"dry run: nothing was removed; run again with --yes to remove {len(r['remove'])} version(s)")
    return 0


COMMANDS = [Command("export", _export_parser, _export), Command("policy", _policy_parser, _policy),
            Command("promote", _promote_parser, _promote), Command("rollback", _rollback_parser, _rollback),
            Command("prune", _prune_parser, _prune)]
