"""Versions that share their content: an ONNX model's weights are files named by their sha256, and every file of at
least SHARED_MIN_BYTES is kept once in the store's blobs/ (hard links into each version that holds it), so a
version adds only what changed. Every version still verifies and loads; a SIGKILL after the content is shared and
before the version is visible leaves the store green, and prune sweeps what no version lists. (On a bucket:
tests/test_object_store.py.)"""
import json
import os
import shutil
import signal

import numpy as np
import pytest

from cl_serve.serving.model import load_version
from cl_serve.store.model_store import SHARED_MIN_BYTES, Store
from cl_serve.workflow import pipeline, retention, versions
from tests.conftest import disk_bytes, fast_train, init_tiny_store, run_cli

CLI_TRAIN = ["--epochs", "1", "--batch-size", "16", "--lr", "2e-3", "--device", "cpu"]


def _blobs_and_listed(root) -> tuple[set, set]:
    s = Store(root)
    listed = {s.manifest(v).files[n] for v in s.versions() for n in s.manifest(v).shared}
    return set(s.backend.blobs()), listed


@pytest.mark.parametrize("method", ["none", "inflora"])
def test_a_version_stores_only_what_changed_and_every_version_loads(tmp_path, tasks, method):
    root = init_tiny_store(tmp_path / "store", method)
    pipeline.add_task(root, tasks[0]["train"], fast_train(epochs=1), progress=False)
    held = disk_bytes(root / "versions", root / "blobs")
    pipeline.add_task(root, tasks[1]["train"], fast_train(epochs=1), progress=False)
    s = Store(root)
    m1, m2 = s.verified(1).manifest, s.verified(2).manifest
    d1, d2 = s.version_dir(1), s.version_dir(2)
    assert m2.onnx.data and set(m2.onnx.data) <= set(m2.shared)  # the weights: files of their own, shared
    assert all((d2 / n).stat().st_size >= SHARED_MIN_BYTES for n in m2.shared)
    common = set(m1.onnx.data) & set(m2.onnx.data)
    if method == "none":  # the backbone is byte-identical; the tiny head (< 4 KiB) lives in the graph, which changed
        assert common == set(m1.onnx.data) and m1.files["model.onnx"] != m2.files["model.onnx"]
    else:  # InfLoRA's adapted layers changed, the rest did not
        assert common and len(common) < len(m2.onnx.data)
    assert all(os.path.samefile(d1 / n, d2 / n) and os.path.samefile(d2 / n, root / "blobs" / m2.files[n])
               for n in common)  # one copy on disk
    logical = sum((d2 / n).stat().st_size for n in m2.files)
    added = disk_bytes(root / "versions", root / "blobs") - held
    assert added == logical - sum((d2 / n).stat().st_size for n in common) + (d2 / "manifest.json").stat().st_size
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    for v, n in ((1, 3), (2, 6)):  # ONNX Runtime reads each version's weights through its own directory
        assert load_version(s, v).run(x).shape == (2, n)
    assert _blobs_and_listed(root)[0] == _blobs_and_listed(root)[1]


def test_a_publish_killed_after_sharing_leaves_the_store_green_and_prune_sweeps_its_content(tmp_path, tasks):
    root = init_tiny_store(tmp_path / "store", "none")
    pipeline.add_task(root, tasks[0]["train"], fast_train(epochs=1), progress=False)
    args = ["add-task", "--store", str(root), "--data", str(tasks[1]["train"]), *CLI_TRAIN]
    r = run_cli(*args, env={"CL_SERVE_FAULT": "publish-after-share"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    blobs, listed = _blobs_and_listed(root)
    assert blobs > listed  # the killed version's new content is in blobs/, no manifest lists it
    st = json.loads(run_cli("status", "--store", str(root), "--json").stdout)
    assert st["verified"] and st["serving"] == {"version": 1} and [v["version"] for v in st["versions"]] == [1]
    r = run_cli("prune", "--store", str(root), "--keep", "5", "--yes", "--json")  # removes no version
    assert r.returncode == 0 and json.loads(r.stdout)["bytes_freed"] > 0, r.stderr
    assert _blobs_and_listed(root)[0] == _blobs_and_listed(root)[1]
    assert run_cli(*args).returncode == 0 and Store(root).verified(2)


def test_the_sweep_deletes_nothing_while_a_manifest_is_unreadable(tmp_path, tasks):
    root = init_tiny_store(tmp_path / "store", "none")
    pipeline.add_task(root, tasks[0]["train"], fast_train(epochs=1), progress=False)
    pipeline.add_task(root, tasks[1]["train"], fast_train(epochs=1), progress=False)
    (root / "blobs" / ("0" * 64)).write_bytes(b"x" * 5000)  # content no manifest lists
    manifest = root / "versions" / "0001" / "manifest.json"
    good = manifest.read_text()
    manifest.write_text("{broken")
    s = Store(root)
    with s.lock():
        assert s.sweep_shared() == 0  # what version 1 lists is unknown: keep everything
    manifest.write_text(good)
    with s.lock():
        assert s.sweep_shared() == 5000
    assert _blobs_and_listed(root)[0] == _blobs_and_listed(root)[1]


def test_a_year_of_weekly_versions_stays_within_its_bytes_with_and_without_prune(tmp_path, tasks):
    """52 weekly versions of one model whose head state changes every week (learner.safetensors rewritten, the
    rest byte-identical, as with --method none), published into two stores: each version adds its own small files
    only; in the second, `prune --keep 8` every four weeks keeps eight versions and leaves the store green."""
    stores = [init_tiny_store(tmp_path / name, "none") for name in ("all", "pruned")]
    for root in stores:
        pipeline.add_task(root, tasks[0]["train"], fast_train(epochs=1), progress=False)
    first = Store(stores[0]).verified(1)
    learner = (first.path / "learner.safetensors").stat().st_size
    private = sum((first.path / n).stat().st_size for n in first.manifest.files if n not in first.manifest.shared)
    per_week = private + (first.path / "manifest.json").stat().st_size + 256  # a manifest naming its own files
    base = [disk_bytes(r / "versions", r / "blobs") for r in stores]
    rng = np.random.default_rng(0)
    for week in range(2, 53):
        state = rng.bytes(learner)
        for root in stores:
            s = Store(root)
            with s.lock():
                w = s.new_version()
                for n in first.manifest.files:
                    shutil.copyfile(first.path / n, w.file(n))  # new bytes on disk: the store finds them shared
                w.file("learner.safetensors").write_bytes(state)
                s.publish(w, first.manifest.model_copy(update={"parent": week - 1}))
        if week % 4 == 0:
            retention.prune(stores[1], keep=8, apply=True)
            st = versions.status(stores[1])
            assert st["verified"] and st["healthy"], st
    assert Store(stores[0]).versions() == list(range(1, 53))
    assert disk_bytes(stores[0] / "versions", stores[0] / "blobs") <= base[0] + 51 * per_week
    assert Store(stores[1]).versions() == list(range(45, 53))
    assert disk_bytes(stores[1] / "versions", stores[1] / "blobs") <= base[1] + 7 * per_week
    assert _blobs_and_listed(stores[1])[0] == _blobs_and_listed(stores[1])[1]


def _as_written_before_sharing(root, v: int) -> None:
    """Rewrite version v as versions were before shared content: one self-contained ONNX file, every file its own
    copy in the version's directory, a manifest without `shared` or ONNX `data`."""
    import hashlib

    import onnx

    from cl_serve.export.external_data import load_model

    d = root / "versions" / f"{v:04d}"
    manifest = json.loads((d / "manifest.json").read_text())
    model = load_model(d / "model.onnx")
    learner = (d / "learner.safetensors").read_bytes()
    for n in manifest["files"]:
        (d / n).unlink()  # names of shared content: never written through
    onnx.save(model, str(d / "model.onnx"))
    (d / "learner.safetensors").write_bytes(learner)
    shutil.rmtree(root / "blobs")
    manifest["files"] = {n: hashlib.sha256((d / n).read_bytes()).hexdigest()
                         for n in ("learner.safetensors", "model.onnx")}
    del manifest["shared"], manifest["onnx"]["data"]
    (d / "manifest.json").write_text(json.dumps(manifest))


def test_a_store_written_before_sharing_is_read_and_its_next_versions_share(tmp_path, tasks):
    root = init_tiny_store(tmp_path / "store", "none")
    pipeline.add_task(root, tasks[0]["train"], fast_train(epochs=1), progress=False)
    _as_written_before_sharing(root, 1)
    s = Store(root)
    old = s.verified(1).manifest
    assert old.shared == [] and old.onnx.data == [] and sorted(old.files) == ["learner.safetensors", "model.onnx"]
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    assert load_version(s, 1).run(x).shape == (2, 3)
    for t in (1, 2):
        pipeline.add_task(root, tasks[t]["train"], fast_train(epochs=1), progress=False)
    s = Store(root)
    m2, m3 = s.verified(2).manifest, s.verified(3).manifest
    assert m2.shared and set(m2.onnx.data) & set(m3.onnx.data)  # new versions share among themselves
    common = set(m2.onnx.data) & set(m3.onnx.data)
    assert all(os.path.samefile(s.version_dir(2) / n, s.version_dir(3) / n) for n in common)
    st = json.loads(run_cli("status", "--store", str(root), "--json").stdout)
    assert st["verified"] and [v["version"] for v in st["versions"]] == [1, 2, 3]
    r = run_cli("prune", "--store", str(root), "--keep", "1", "--yes", "--allow-rollback-target", "--json")
    assert json.loads(r.stdout)["removed"] == [1, 2] and _blobs_and_listed(root)[0] == _blobs_and_listed(root)[1]
    assert load_version(Store(root), 3).run(x).shape == (2, 9)
