"""`cl-serve export --int8`: attach an int8 ONNX file to a version, for CPUs, only when it is close enough to the
fp32 file. The int8 file is made from the version's fp32 ONNX (cl_serve.export.quantize), both are run on
labelled held-out images (the release policy's gate data unless another folder is given), and the file is
attached only when its top-1 agreement with fp32 is at least `min_agreement` and its accuracy at most `max_drop`
below fp32's (default: the policy's max_drop); the comparison is stated in the manifest (`onnx_int8.quantization`).
A refused file changes nothing. Attaching follows `cl_serve.store.onnx_switch`: a new content-addressed name, the
manifest switched atomically, never a file rewritten in place.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import numpy as np

from cl_serve.base.errors import StoreError, UserError
from cl_serve.contract.preprocessing import Preprocessing, normalize
from cl_serve.export.external_data import onnx_bytes
from cl_serve.export.quantize import compare, quantize_int8
from cl_serve.store.model_store import LOCK_HINTS
from cl_serve.store.onnx_switch import staging_dir, switch_onnx
from cl_serve.store.open_store import open_store
from cl_serve.store.remote_inputs import local_copy

MIN_AGREEMENT = 0.98
BATCH = 64


class QuantizationRefused(UserError):
    """The int8 file strays too far from fp32 on the held-out images; nothing was attached."""


def _batches(data, p: Preprocessing) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    labels = data.labels.numpy()
    for i in range(0, len(data), BATCH):
        yield normalize(data.eval_u8[i:i + BATCH].numpy(), p), labels[i:i + BATCH]


def _held_out(m, data_dir: str | None, progress: bool):
    from cl_serve.trainer.data import check_known_classes, load_task_data, scan_image_folder

    source = data_dir
    if not source:
        raise UserError("an int8 file is judged against fp32 on labelled held-out images: pass --gate-data DIR "
                        "or give the store a release policy (cl-serve policy --gate-data DIR)")
    found = scan_image_folder(local_copy(source))
    check_known_classes(found, m.labels)
    return source, load_task_data(found, m.preprocessing, train_view=False, class_names=m.labels,
                                  progress=progress, desc="int8 check: decoding")


def quantize_version(root: str | Path, version: int | None = None, *, gate_data: str | None = None,
                     min_agreement: float = MIN_AGREEMENT, max_drop: float | None = None,
                     progress: bool = False) -> dict[str, Any]:
    """Make, judge and (when it passes) attach the int8 file of a version; returns the comparison and the file.
    Raises QuantizationRefused with the numbers when it does not pass."""
    if not 0.0 <= min_agreement <= 1.0 or (max_drop is not None and not 0.0 <= max_drop <= 1.0):
        raise UserError("--min-agreement and --max-drop are fractions from 0 to 1")
    store = open_store(root)
    with store.lock(hint=LOCK_HINTS["export"]):
        handle = store.verified_or_live(version)
        v, m = handle.number, handle.manifest
        fp32 = m.onnx_file()
        if fp32 is None:
            raise StoreError(f"version {v} has no fp32 ONNX file to quantize; run `cl-serve export --version {v}`")
        policy = store.policy()
        source, data = _held_out(m, gate_data or policy.gate_data, progress)
        allowed = policy.max_drop if max_drop is None else max_drop
        with staging_dir(store, v) as staged:
            tmp = staged / "model.int8.onnx"
            info = quantize_int8(store.version_dir(v) / fp32, tmp)
            check = compare(store.version_dir(v) / fp32, tmp, _batches(data, m.preprocessing))
            verdict = {"method": "dynamic", "data": str(source), "images": check["images"],
                       "agreement": check["agreement"], "accuracy_fp32": check["accuracy_fp32"],
                       "accuracy_int8": check["accuracy_int8"], "min_agreement": min_agreement, "max_drop": allowed}
            drop = check["accuracy_fp32"] - check["accuracy_int8"]
            if check["agreement"] < min_agreement or drop > allowed:
                raise QuantizationRefused(
                    f"int8 refused for version {v}: top-1 agreement with fp32 {check['agreement']:.4f} (needs >= "
                    f"{min_agreement}), accuracy {check['accuracy_int8']:.4f} vs {check['accuracy_fp32']:.4f} fp32 "
                    f"(drop {drop:.4f}, allowed {allowed}) on {check['images']} images of {source}; nothing attached")
            name = switch_onnx(store, handle, tmp, {**info, "quantization": verdict}, precision="int8")
    return {"version": v, "file": str(store.version_dir(v) / name), "bytes": onnx_bytes(store.version_dir(v) / name),
            "fp32_bytes": onnx_bytes(store.version_dir(v) / fp32), **verdict,
            "max_abs_logit_diff": check["max_abs_logit_diff"]}
