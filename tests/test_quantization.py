"""int8 on CPUs: `cl-serve export --int8` makes an int8 file from a version's fp32 ONNX with ONNX Runtime's
quantizer, judges it against fp32 on held-out images, attaches it (content-addressed, verified like every file,
the comparison in the manifest) only when it passes, and changes nothing when it does not; a server asked for int8
loads it, and loads fp32 where a version has none."""
import json

import numpy as np
import pytest

from cl_serve.base.errors import UserError
from cl_serve.serving.model import load_version
from cl_serve.store.model_store import Store
from cl_serve.workflow import pipeline, quantization
from tests.conftest import fast_train, init_tiny_store, run_cli, tree_snapshot


def int8_metadata(path) -> dict:
    import onnx

    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


@pytest.fixture()
def store(tmp_path, tasks):
    root = init_tiny_store(tmp_path / "store", "none")
    pipeline.add_task(root, tasks[0]["train"], fast_train(), progress=False)
    return root


def test_int8_is_attached_with_its_comparison_and_served_when_asked(store, tasks):
    r = run_cli("export", "--store", str(store), "--int8", "--gate-data", str(tasks[0]["test"]),
                "--min-agreement", "0.5", "--max-drop", "0.5")
    assert r.returncode == 0, r.stderr
    assert "attached int8 to version 1" in r.stdout and "top-1 agreement" in r.stdout
    s = Store(store)
    m = s.verified(1).manifest  # every byte, the int8 file included, verified against the manifest
    name = m.onnx_file(precision="int8")
    assert name is not None and name.startswith("model.int8.") and name in m.files
    q = m.onnx_int8.quantization
    assert q.images == len(list(tasks[0]["test"].rglob("*.png"))) and q.data == str(tasks[0]["test"])
    assert 0.5 <= q.agreement <= 1 and q.accuracy_fp32 - q.accuracy_int8 <= 0.5 and m.onnx_int8.dtype == "int8"
    size = lambda precision: sum((s.version_dir(1) / n).stat().st_size for n in m.onnx_files(precision))  # noqa: E731
    assert m.onnx_int8.data and set(m.onnx_int8.data) <= set(m.shared)  # its weights: files of their own, shared
    assert size("int8") < 0.8 * size("fp32")  # graph and weights; tiny: 0.7
    meta = int8_metadata(s.version_dir(1) / name)
    assert meta["cl_serve.dtype"] == "int8" and meta["cl_serve.labels"] == json.dumps(m.labels)
    int8, fp32 = load_version(s, 1, precision="int8"), load_version(s, 1)
    assert int8.onnx_file == name and fp32.onnx_file == m.onnx_file()
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    a, b = int8.run(x), fp32.run(x)
    assert a.shape == b.shape and not np.array_equal(a, b) and np.abs(a - b).max() < 0.5 * np.abs(b).max()
    assert json.loads(run_cli("status", "--store", str(store), "--json").stdout)["current"] == 1


def test_a_version_without_int8_serves_fp32(store):
    s = Store(store)
    assert load_version(s, 1, precision="int8").onnx_file == s.manifest(1).onnx_file()


def test_session_settings_reach_onnx_runtime(store):
    from cl_serve.serving.settings import SessionSettings

    def entry(model):
        return model.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    quiet = load_version(Store(store), 1, SessionSettings(intra_op_threads=1, spinning=False))
    assert entry(quiet) == "0" and quiet.session.get_session_options().intra_op_num_threads == 1
    assert entry(load_version(Store(store), 1)) == "1"


def test_a_refused_int8_file_changes_nothing(store, tasks, monkeypatch):
    before = tree_snapshot(store)

    def poor(*args, **kw):
        return {"images": 10, "agreement": 0.7, "accuracy_fp32": 0.9, "accuracy_int8": 0.6, "max_abs_logit_diff": 3.0}

    monkeypatch.setattr(quantization, "compare", poor)
    with pytest.raises(quantization.QuantizationRefused, match="agreement with fp32 0.7000"):
        quantization.quantize_version(store, gate_data=str(tasks[0]["test"]))
    assert tree_snapshot(store) == before
    assert Store(store).manifest(1).onnx_int8 is None


def test_int8_needs_held_out_images_and_sane_bounds(store, tasks):
    with pytest.raises(UserError, match="held-out images"):
        quantization.quantize_version(store)  # no --gate-data and no release policy
    with pytest.raises(UserError, match="fractions"):
        quantization.quantize_version(store, gate_data=str(tasks[0]["test"]), min_agreement=2)
    with pytest.raises(UserError, match="unknown to the model"):
        quantization.quantize_version(store, gate_data=str(tasks[1]["test"]))
