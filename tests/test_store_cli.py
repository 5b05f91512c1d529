"""The store and `cl-serve` CLI: versions load into plain timm, bad input changes nothing, a concurrent writer
is refused, a killed add-task leaves the previous version live, a fresh process continues exactly."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import timm
import torch
from safetensors.torch import load_file

from cl_serve.workflow import pipeline
from cl_serve.base.errors import StoreError
from cl_serve.store.model_store import Store
from tests.conftest import TINY, TINY_MODEL, fast_train, init_tiny_store, run_cli, tree_snapshot
from cl_serve.trainer.data import load_task_data, scan_image_folder
from cl_serve.trainer.learner import Learner
from cl_serve.trainer.merge import merged_state_dict
from cl_serve.trainer.methods import method_config_from_dict
from cl_serve.trainer.train import train_task

CLI_TRAIN = ["--epochs", "2", "--batch-size", "16", "--lr", "2e-3", "--device", "cpu"]


def test_cli_three_tasks_produce_versions_that_load_into_plain_timm(tmp_path, tasks):
    store = tmp_path / "store"
    r = run_cli("init", "--store", str(store), "--backbone", TINY_MODEL, "--timm-kwargs", json.dumps(TINY),
                "--method", "inflora", "--rank", "4", "--head", "aligned")  # a linear head: plain timm loads it
    assert r.returncode == 0, r.stderr
    for t in range(3):
        r = run_cli("add-task", "--store", str(store), "--data", str(tasks[t]["train"]),
                    "--test-data", str(tasks[t]["seen"]), *CLI_TRAIN)
        assert r.returncode == 0, r.stderr
        assert f"published version {t + 1}" in r.stdout and "test accuracy" in r.stdout
    s = Store(store)
    assert s.versions() == [1, 2, 3] and s.current() == 3
    m = s.manifest(3)
    assert m.parent == 2 and m.task_index == 2 and len(m.labels) == 9 and len(m.tasks) == 3
    assert m.labels == sum((sorted(tk["classes"]) for tk in tasks[:3]), [])  # task order, sorted within a task
    weights = set(m.onnx.data)  # the graph's weight files, each named by its sha256
    assert weights and all(n.startswith("weights-") and n.endswith(".bin") for n in weights)
    assert set(m.files) == {"learner.safetensors", "model.onnx", *weights}  # plain weights are written on demand
    assert m.onnx.parity_max_abs_diff <= 1e-4
    out = tmp_path / "plain.safetensors"
    r = run_cli("export", "--store", str(store), "--safetensors", str(out))
    assert r.returncode == 0 and "version 3" in r.stdout, r.stderr
    assert {p.name for p in s.version_dir(3).iterdir()} == {"learner.safetensors", "manifest.json", "model.onnx",
                                                             *weights}  # export --safetensors wrote nothing here
    model = timm.create_model(TINY_MODEL, pretrained=False, num_classes=9, **TINY)
    model.load_state_dict(load_file(str(out)), strict=True)
    st = run_cli("status", "--store", str(store), "--json")
    info = json.loads(st.stdout)
    assert info["current"] == 3 and info["classes"] == 9 and info["method"]["name"] == "inflora"
    ev = run_cli("evaluate", "--store", str(store), "--data", str(tasks[2]["seen"]), "--json")
    rep = json.loads(ev.stdout)
    assert rep["version"] == 3 and [p["task"] for p in rep["per_task"]] == [0, 1, 2]
    assert rep["accuracy"] == pytest.approx(m.metrics.test.accuracy)


@pytest.fixture()
def one_version_store(tmp_path, tasks):
    store = init_tiny_store(tmp_path / "store")
    pipeline.add_task(store, tasks[0]["train"], fast_train(), progress=False)
    return store


def _bad_dirs(tmp_path, tasks):
    empty = tmp_path / "empty"
    empty.mkdir()
    no_images = tmp_path / "no_images"
    (no_images / "cat").mkdir(parents=True)
    (no_images / "dog").mkdir()
    shutil.copy(next((tasks[1]["train"] / tasks[1]["classes"][0]).iterdir()), no_images / "dog" / "a.png")
    unreadable = tmp_path / "unreadable"
    (unreadable / "cat").mkdir(parents=True)
    (unreadable / "cat" / "x.png").write_bytes(b"not an image at all")
    overlap = tmp_path / "overlap"
    shutil.copytree(tasks[0]["train"] / tasks[0]["classes"][1], overlap / tasks[0]["classes"][1])
    shutil.copytree(tasks[1]["train"] / tasks[1]["classes"][0], overlap / tasks[1]["classes"][0])
    return {
        "missing": (tmp_path / "nope", "does not exist"),
        "empty": (empty, "no class sub-folders"),
        "class without images": (no_images, "without images in"),
        "class without readable images": (unreadable, "without a readable image"),
        "overlapping classes": (overlap, f"already exist in the store: {tasks[0]['classes'][1]}"),
    }


def test_bad_inputs_get_one_clear_error_and_change_nothing(tmp_path, tasks, one_version_store):
    before = tree_snapshot(one_version_store)
    for case, (path, message) in _bad_dirs(tmp_path, tasks).items():
        r = run_cli("add-task", "--store", str(one_version_store), "--data", str(path), *CLI_TRAIN)
        assert r.returncode == 2, (case, r.stderr)
        assert message in r.stderr, (case, r.stderr)
        assert [line for line in r.stderr.splitlines() if "error:" in line] == [r.stderr.strip().splitlines()[-1]]
        assert tree_snapshot(one_version_store) == before, case


def test_corrupt_files_are_reported_or_refused_with_strict(tmp_path, tasks, one_version_store):
    data = tmp_path / "task"
    shutil.copytree(tasks[1]["train"], data)
    cls = tasks[1]["classes"][0]
    (data / cls / "broken1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (data / cls / "broken2.jpg").write_bytes(b"")
    before = tree_snapshot(one_version_store)
    r = run_cli("add-task", "--store", str(one_version_store), "--data", str(data), "--strict", *CLI_TRAIN)
    assert r.returncode == 2 and "2 corrupt image(s)" in r.stderr and "broken1.png" in r.stderr
    assert tree_snapshot(one_version_store) == before
    r = run_cli("add-task", "--store", str(one_version_store), "--data", str(data), "--json", *CLI_TRAIN)
    assert r.returncode == 0, r.stderr
    assert Store(one_version_store).manifest(2).training.corrupt_skipped == 2


def test_concurrent_writer_is_refused_at_once_and_store_unchanged(tasks, one_version_store):
    s = Store(one_version_store)
    before = tree_snapshot(one_version_store)
    with s.lock():
        t0 = time.time()
        r = run_cli("add-task", "--store", str(one_version_store), "--data", str(tasks[1]["train"]), *CLI_TRAIN,
                    process=True)
        assert r.returncode == 2 and "locked by another writer" in r.stderr and f"pid {os.getpid()}" in r.stderr
        assert time.time() - t0 < 30
    assert tree_snapshot(one_version_store) == before
    with s.lock():
        with s.lock():  # re-entrant on one Store object: a command locks, then hands that store to its steps
            pass
        with pytest.raises(StoreError, match="locked by another writer"):  # another Store object is another writer
            with Store(one_version_store).lock():
                pass
        r = run_cli("rollback", "--store", str(one_version_store), "--version", "1", process=True)  # still held
        assert r.returncode == 2 and "locked by another writer" in r.stderr


def test_broken_store_and_bad_settings_are_clear_errors(tmp_path, tasks, one_version_store):
    r = run_cli("add-task", "--store", str(tmp_path / "none"), "--data", str(tasks[1]["train"]))
    assert r.returncode == 2 and "no model store" in r.stderr
    r = run_cli("add-task", "--store", str(one_version_store), "--data", str(tasks[1]["train"]), "--epochs", "0")
    assert r.returncode == 2 and "epochs" in r.stderr
    r = run_cli("init", "--store", str(tmp_path / "x"), "--backbone", TINY_MODEL, "--method", "inflora", "--eps0", "2")
    assert r.returncode == 2 and "eps0" in r.stderr
    (one_version_store / "CURRENT").write_text("0042\n")
    r = run_cli("status", "--store", str(one_version_store))
    assert r.returncode == 2 and "CURRENT names version 42" in r.stderr


@pytest.mark.parametrize("fault", ["training", "before-rename", "before-current"])
def test_killed_add_task_leaves_previous_version_live_and_rerun_succeeds(tasks, one_version_store, fault):
    s = Store(one_version_store)
    args = ["add-task", "--store", str(one_version_store), "--data", str(tasks[1]["train"]), *CLI_TRAIN]
    if fault == "training":
        proc = subprocess.Popen([sys.executable, "-m", "cl_serve.cli", *args[:-8], "--epochs", "500",
                                 "--batch-size", "16", "--device", "cpu"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and b"pid" not in (s.lock_path.read_bytes() if s.lock_path.exists() else b""):
            time.sleep(0.2)
        time.sleep(3)  # well into training
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    else:
        r = run_cli(*args, env={"CL_SERVE_FAULT": fault})
        assert r.returncode == -signal.SIGKILL
    assert s.current() == 1  # the previous version is live ...
    s.verified(1)  # ... and intact
    assert pipeline.status(one_version_store)["current"] == 1
    r = run_cli(*args)
    assert r.returncode == 0, r.stderr
    v = s.current()
    assert v >= 2 and s.manifest(v).parent == 1
    assert not list(s.versions_dir.glob(".tmp-*"))  # the crashed attempt's leftovers are gone


@pytest.mark.parametrize("method", ["inflora"])  # sdlora's state takes the same path (test_learner_format)
def test_add_task_in_fresh_processes_equals_one_long_process(tmp_path, tasks, method):
    store = init_tiny_store(tmp_path / "store", method)
    for t in range(3):
        r = run_cli("add-task", "--store", str(store), "--data", str(tasks[t]["train"]), *CLI_TRAIN, process=True)
        assert r.returncode == 0, r.stderr
    s = Store(store)
    spec, weights = pipeline._backbone(s)
    learner = Learner(spec, weights, method_config_from_dict(s.config().method))
    prep = s.config().preprocessing
    for t in range(3):
        train_task(learner, load_task_data(scan_image_folder(tasks[t]["train"]), prep), prep, fast_train(),
                   progress=False)
    one_process = merged_state_dict(learner)
    stored = pipeline.merged_weights(s, 3)
    assert stored.keys() == one_process.keys()
    worst = max((stored[k] - one_process[k]).abs().max().item() for k in stored)
    assert worst <= 1e-5, worst
    if method == "sdlora":  # magnitudes learned in task 2 are saved and reloaded
        v2 = pipeline.open_learner(s, 2).method.magnitudes()
        t1 = {k: v for k, v in v2.items() if k.endswith(".t1")}
        assert t1 and any(abs(v - 1.0) > 1e-4 for v in t1.values())
        v3 = pipeline.open_learner(s, 3).method.magnitudes()
        assert set(v2) < set(v3)


def test_rollback_moves_current_and_refuses_unknown_versions(tasks, one_version_store):
    pipeline.add_task(one_version_store, tasks[1]["train"], fast_train(), progress=False)
    r = run_cli("rollback", "--store", str(one_version_store), "--version", "1")
    assert r.returncode == 0 and Store(one_version_store).current() == 1
    r = run_cli("rollback", "--store", str(one_version_store), "--version", "9")
    assert r.returncode == 2 and "version 9 does not exist" in r.stderr


def test_a_version_written_with_merged_weights_still_verifies_and_is_read_from_its_file(tmp_path, one_version_store):
    """Versions published before merged weights became on-demand list merged.safetensors: it is verified like any
    file and read instead of merging again (a changed value in it shows which one was used)."""
    from safetensors.torch import save_file

    from cl_serve.store.model_store import atomic_write_text, sha256_file

    s = Store(one_version_store)
    state = pipeline.merged_weights(s, 1)
    old = {k: v.clone() for k, v in state.items()}
    key = next(iter(old))
    old[key] += 1.0
    d, m = s.version_dir(1), s.manifest(1)
    save_file(old, str(d / "merged.safetensors"))
    atomic_write_text(d / "manifest.json", m.model_copy(update={"files": {
        **m.files, "merged.safetensors": sha256_file(d / "merged.safetensors")}}).model_dump_json(indent=2))
    fresh = Store(one_version_store)
    read = pipeline.merged_weights(fresh, 1)
    assert torch.equal(read[key], old[key]) and not torch.equal(read[key], state[key])
    assert run_cli("status", "--store", str(one_version_store)).returncode == 0
    with open(d / "merged.safetensors", "r+b") as f:  # and it is verified like every listed file
        f.seek(100)
        f.write(b"\x00\x01")
    with pytest.raises(StoreError, match="merged.safetensors does not match"):
        pipeline.merged_weights(Store(one_version_store), 1)
