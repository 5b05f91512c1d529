"""The ONNX parity gate: a faithful export passes, a wrong one is refused with one line, and a model so sensitive
to rounding that two correct fp32 programs disagree is judged against its float64 answer instead of refused."""
import pytest
import torch
from torch import nn

from cl_serve.contract.preprocessing import Preprocessing
from cl_serve.export.onnx_export import export_onnx
from cl_serve.export.parity import ParityError, check_parity

PREP = Preprocessing(input_size=16, scale_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


class Features(nn.Module):
    """A small conv net to 64 features, then `head`."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 4, stride=4), nn.GELU(), nn.Flatten(), nn.Linear(256, 64))
        self.head = head

    def forward(self, x):
        return self.head(self.body(x))


class Cancelling(nn.Module):
    """Logits of order 1 as the difference of two order-1e4 projections of the same features: every last-bit
    rounding difference of the large terms shows in the small result (what a ridge head with large, cancelling
    weights over features that barely vary does)."""

    def __init__(self, classes: int = 5):
        super().__init__()
        big = torch.randn(classes, 64) * 1e4
        self.a = nn.Parameter(big + torch.randn(classes, 64))
        self.b = nn.Parameter(big)

    def forward(self, f):
        return f @ self.a.T - f @ self.b.T


def export(model, path):
    export_onnx(model.eval(), path, preprocessing=PREP, labels=[str(i) for i in range(5)])
    return path


def test_faithful_export_passes_without_the_float64_reference(tmp_path):
    torch.manual_seed(0)
    model = Features(nn.Linear(64, 5))
    p = check_parity(model, export(model, tmp_path / "m.onnx"), 16)
    assert p.max_abs_diff <= 1e-5 and p.bound >= 1e-4 and p.torch_fp32_error is None


def test_wrong_export_is_refused(tmp_path):
    torch.manual_seed(0)
    model = Features(nn.Linear(64, 5))
    path = export(model, tmp_path / "m.onnx")
    with torch.no_grad():
        model.head.weight[0, 0] += 0.05  # the weights the file was not exported from
    with pytest.raises(ParityError, match="float64"):
        check_parity(model, path, 16)


def test_rounding_sensitive_model_is_judged_against_float64(tmp_path):
    torch.manual_seed(0)
    model = Features(Cancelling())
    path = export(model, tmp_path / "m.onnx")
    p = check_parity(model, path, 16)
    # the two fp32 programs disagree beyond the plain bound, and each is as far from the exact answer as the other
    assert p.max_abs_diff > 1e-4 * 5 and p.torch_fp32_error is not None
    assert p.onnx_fp64_error <= p.bound and p.bound >= p.torch_fp32_error
    assert next(model.parameters()).dtype == torch.float32  # the model is handed back in fp32
    with torch.no_grad():
        model.head.b[0, 0] += 1.0  # now the export is wrong by far more than rounding
    with pytest.raises(ParityError, match="not publishing"):
        check_parity(model, path, 16)
