"""int8 weights for CPUs: ONNX Runtime's dynamic quantization of a version's fp32 ONNX file (the MatMul and Gemm
weights to int8 per output channel, activations quantized on the fly at run time), and the comparison that decides
whether the result may serve: top-1 agreement with the fp32 file and the accuracy of each on labelled images.
No torch: it reads and writes ONNX files only.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from cl_serve.export.external_data import load_model, save_split

QUANTIZED_OPS = ["MatMul", "Gemm"]


@contextlib.contextmanager
def _quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def quantize_int8(source: Path, target: Path) -> dict[str, Any]:
    """Write the int8 file of `source` to `target` (its weight files beside it: give it a directory of its own),
    keeping the metadata the server checks (labels, preprocessing); returns the OnnxInfo fields of the new file."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    original = load_model(source)
    # The exporter's intermediate shape annotations can disagree with ONNX's own shape inference, which the
    # quantizer runs first: start it from the graph alone (staged beside the target; the version's file is not
    # touched).
    del original.graph.value_info[:]
    staged = target.with_name(target.name + ".fp32")
    try:
        onnx.save(original, str(staged))
        with _quiet_root_logger():  # its advice to pre-process is logged on every call, as a warning
            quantize_dynamic(str(staged), str(target), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=QUANTIZED_OPS)
    finally:
        staged.unlink(missing_ok=True)
    quantized = load_model(target)
    props = {p.key: p.value for p in quantized.metadata_props}
    onnx.helper.set_model_props(quantized, {**props, **{p.key: p.value for p in original.metadata_props},
                                            "cl_serve.dtype": "int8"})
    data = save_split(quantized, target)
    opset = next((o.version for o in quantized.opset_import if o.domain in ("", "ai.onnx")), 0)
    return {"opset": int(opset), "dtype": "int8", "input": original.graph.input[0].name,
            "output": original.graph.output[0].name, "dynamic_batch": True, "data": data}


def _session(path: Path):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def compare(fp32: Path, int8: Path, batches: Iterable[tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Both files on the same (images, labels) batches: the share of images with the same top-1 class, each
    file's accuracy, the largest |logit| difference."""
    a, b = _session(fp32), _session(int8)
    name = a.get_inputs()[0].name
    same = right_a = right_b = n = 0
    worst = 0.0
    for x, y in batches:
        la, lb = a.run(None, {name: x})[0], b.run(None, {name: x})[0]
        pa, pb = la.argmax(1), lb.argmax(1)
        same += int((pa == pb).sum())
        right_a += int((pa == y).sum())
        right_b += int((pb == y).sum())
        worst = max(worst, float(np.abs(la - lb).max()))
        n += len(y)
    if n == 0:
        raise ValueError("no images to compare the int8 file on")
    return {"images": n, "agreement": same / n, "accuracy_fp32": right_a / n, "accuracy_int8": right_b / n,
            "max_abs_logit_diff": worst}
