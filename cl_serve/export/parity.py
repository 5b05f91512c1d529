"""Parity gate: ONNX Runtime must reproduce the merged torch model's logits before a version is published.

Random inputs at several batch sizes (so the dynamic batch axis is exercised). fp32 exports must agree with torch
within 1e-4 max abs logit difference, fp16 exports within a looser bound, both scaled by the largest |logit| when
that is above 1 (float rounding is relative: a ridge head over unnormalised features can produce logits in the
hundreds on random inputs).

A model can be so sensitive to rounding that two correct fp32 programs disagree by more than that (a ridge head
with large, cancelling weights over features that barely vary amplifies every last-bit difference: DINOv2-S at
518 px with random weights did). When the fp32 check fails, the same inputs run through the model in float64: the
export passes if ONNX Runtime is within `ROUNDING_FACTOR` times torch's own fp32 error of the float64 answer, i.e. it
is as faithful to the model as torch itself. A wrong export (a dropped op, wrong weights) misses by orders of
magnitude more. Above both bounds, `ParityError` refuses the export.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from cl_serve.base.errors import UserError

FP32_TOLERANCE = 1e-4
FP16_TOLERANCE = 5e-2
ROUNDING_FACTOR = 16.0  # ORT's kernels sum in other orders than torch's: a few times torch's own fp32 error


class ParityError(UserError, RuntimeError):
    """The exported model does not compute what the merged torch model computes (one line on the CLI, not a
    traceback: nothing is published)."""


@dataclass(frozen=True)
class Parity:
    """What the gate measured: the largest |ONNX - torch| logit, the bound it was held to, and, when the float64
    reference was needed, torch's own fp32 error and ONNX Runtime's against that reference."""

    max_abs_diff: float
    bound: float
    torch_fp32_error: float | None = None
    onnx_fp64_error: float | None = None

    def manifest_fields(self) -> dict[str, float]:
        """The manifest's `onnx.parity_*` entries (`OnnxInfo`): each field measured, prefixed."""
        return {f"parity_{k}": v for k, v in asdict(self).items() if v is not None}


def check_parity(model: torch.nn.Module, onnx_path: str | Path, input_size: int, *, fp16: bool = False,
                 batch_sizes=(1, 3, 8), seed: int = 0, tolerance: float | None = None) -> Parity:
    """Compare ONNX Runtime with torch on random inputs; raises ParityError when the export is not faithful."""
    import onnxruntime as ort

    tol = tolerance if tolerance is not None else (FP16_TOLERANCE if fp16 else FP32_TOLERANCE)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    gen = torch.Generator().manual_seed(seed)
    model = model.float().eval()
    inputs, refs, outs = [], [], []
    for b in batch_sizes:
        x = torch.randn(b, 3, input_size, input_size, generator=gen)
        with torch.no_grad():
            ref = model(x).numpy()
        got = sess.run(None, {name: x.numpy().astype(np.float16 if fp16 else np.float32)})[0].astype(np.float32)
        if got.shape != ref.shape:
            raise ParityError(f"ONNX output shape {got.shape} != torch {ref.shape} at batch {b}")
        inputs.append(x), refs.append(ref), outs.append(got)
    worst = max(float(np.abs(o - r).max()) for o, r in zip(outs, refs))
    scale = max([1.0] + [float(np.abs(r).max()) for r in refs])
    bound = tol * scale
    if not np.isfinite(worst):
        raise ParityError("non-finite logits on the parity inputs (from ONNX Runtime, or from torch itself); "
                          "not publishing")
    if worst <= bound:
        return Parity(worst, bound)
    if fp16:
        raise ParityError(f"ONNX Runtime logits differ from torch by {worst:.3g} (tolerance {tol:g} x largest "
                          f"|logit| {scale:.3g}); not publishing")
    torch_err, onnx_err = _errors_against_float64(model, inputs, refs, outs)
    rounding_bound = max(bound, ROUNDING_FACTOR * torch_err)
    if onnx_err > rounding_bound:
        raise ParityError(f"ONNX Runtime logits differ from torch by {worst:.3g} (tolerance {tol:g} x largest "
                          f"|logit| {scale:.3g}) and from the float64 model by {onnx_err:.3g}, more than "
                          f"{ROUNDING_FACTOR:g} x torch's own fp32 error {torch_err:.3g}; not publishing")
    return Parity(worst, rounding_bound, torch_fp32_error=torch_err, onnx_fp64_error=onnx_err)


def _errors_against_float64(model: torch.nn.Module, inputs, refs, outs) -> tuple[float, float]:
    """Largest |torch fp32 - float64| and |ONNX - float64| logit over the parity inputs (the model is converted
    to float64 for the pass and back: float32 -> float64 -> float32 is exact)."""
    torch_err = onnx_err = 0.0
    try:
        model.double()
        for x, ref, got in zip(inputs, refs, outs):
            with torch.no_grad():
                exact = model(x.double()).numpy()
            torch_err = max(torch_err, float(np.abs(ref - exact).max()))
            onnx_err = max(onnx_err, float(np.abs(got - exact).max()))
    finally:
        model.float()
    return torch_err, onnx_err
