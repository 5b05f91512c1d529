"""Parity gate: ONNX Runtime must reproduce the merged torch model's logits before a version is published.

Random inputs at several batch sizes (so the dynamic batch axis is exercised); fp32 exports must agree within
1e-4 max abs logit difference, fp16 exports within a looser bound, both scaled by the largest |logit| when that is
above 1 (float rounding is relative: a ridge head over unnormalised features can produce logits in the hundreds on
random inputs). Above it, `ParityError` refuses the export.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from cl_serve.base.errors import UserError

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-2


class ParityError(UserError, RuntimeError):
    """The exported model does not compute what the merged torch model computes (one line on the CLI, not a
    traceback: nothing is published)."""


def check_parity(model: torch.nn.Module, onnx_path: str | Path, input_size: int, *, fp16: bool = False,
                 batch_sizes=(1, 3, 8), seed: int = 0, tolerance: float | None = None) -> float:
    """Max abs logit difference over random inputs; raises ParityError above the tolerance."""
    import onnxruntime as ort

    tol = tolerance if tolerance is not None else (FP16_TOLERANCE if fp16 else FP32_TOLERANCE)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    worst, scale = 0.0, 1.0
    model = model.float().eval()
    for b in batch_sizes:
        x = torch.randn(b, 3, input_size, input_size, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        feed = x.numpy().astype(np.float16 if fp16 else np.float32)
        got = sess.run(None, {name: feed})[0].astype(np.float32)
        if got.shape != ref.shape:
            raise ParityError(f"ONNX output shape {got.shape} != torch {ref.shape} at batch {b}")
        worst = max(worst, float(np.abs(got - ref).max()))
        scale = max(scale, float(np.abs(ref).max()))
    if not np.isfinite(worst) or worst > tol * scale:
        raise ParityError(f"ONNX Runtime logits differ from torch by {worst:.3g} (tolerance {tol:g} x largest |logit| "
                          f"{scale:.3g}); not publishing")
    return worst
