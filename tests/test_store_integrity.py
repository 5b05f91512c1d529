"""The store never lies and never breaks: CURRENT is parsed strictly, `status` verifies, manifests name plain
files only, a re-export killed at any point leaves every version verifiable, crashed writers' temporaries are
cleaned, a second writer is refused before torch is imported, hostile training images are skipped, not fatal."""
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from cl_serve.workflow import pipeline
from cl_serve.base.errors import StoreError
from cl_serve.serving.watcher import ModelWatcher
from cl_serve.store.model_store import Store
from tests.conftest import fast_train, init_tiny_store, run_cli, tree_snapshot
from benchmarks.image_builders import encoded_image, png_header_only

CLI_TRAIN = ["--epochs", "1", "--batch-size", "16", "--lr", "2e-3", "--device", "cpu"]


@pytest.fixture()
def two_version_store(tmp_path, tasks):
    store = init_tiny_store(tmp_path / "store", "none", )
    pipeline.add_task(store, tasks[0]["train"], fast_train(epochs=1), progress=False)
    pipeline.add_task(store, tasks[1]["train"], fast_train(epochs=1), progress=False)
    return store


def _verifies_all(store) -> None:
    s = Store(store)
    for v in s.versions():
        s.verified(v)


GARBAGE = [b"\xff\xfe\x00", "\u00b2".encode(), b"", b"12abc\n", b"-1\n", b"../0001", b"0001\n0002\n",
           "\u0663".encode()]


def test_a_current_that_is_not_ascii_digits_is_a_broken_store_everywhere(two_version_store):
    for garbage in GARBAGE:
        (two_version_store / "CURRENT").write_bytes(garbage)
        with pytest.raises(StoreError, match="broken store: CURRENT holds .* rollback --store .* --version 2"):
            Store(two_version_store).current()
        w = ModelWatcher(str(two_version_store), poll_interval_s=60)  # a server started on it says so, and the fix
        try:
            h = w.status()
            assert not h["ready"] and "broken store" in h["reason"] and "--version 2" in h["reason"], garbage
        finally:
            w.stop()
    for args in (["status"], ["add-task", "--data", "/nonexistent"]):
        r = run_cli(*args, "--store", str(two_version_store))
        assert r.returncode == 2 and "broken store" in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = run_cli("rollback", "--store", str(two_version_store), "--version", "2")  # the fix it names works
    assert r.returncode == 0 and Store(two_version_store).current() == 2


def test_links_are_refused_and_never_followed(two_version_store, tmp_path):
    """A CURRENT that is a symbolic link is a broken store (what it points at is never read or printed), and a
    version directory replaced by a link to a directory outside the store is a broken version."""
    import shutil

    current = two_version_store / "CURRENT"
    secret = tmp_path / "secret"
    secret.write_text("2\nroot:x:0:0\n")
    current.unlink()
    current.symlink_to(secret)
    with pytest.raises(StoreError, match="CURRENT is a symbolic link") as e:
        Store(two_version_store).current()
    assert "root:x" not in str(e.value) and "--version 2" in str(e.value)
    r = run_cli("rollback", "--store", str(two_version_store), "--version", "2")  # the fix it names works
    assert r.returncode == 0 and not current.is_symlink() and Store(two_version_store).current() == 2
    s = Store(two_version_store)
    outside = tmp_path / "outside-0001"
    shutil.copytree(s.version_dir(1), outside)
    shutil.rmtree(s.version_dir(1))
    s.version_dir(1).symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError, match="broken version 1: 0001 is a symbolic link"):
        s.verified(1)


def test_status_verifies_and_says_what_a_server_would_serve(two_version_store):
    s = Store(two_version_store)
    r = run_cli("status", "--store", str(two_version_store), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["serving"] == {"version": 2}
    with open(s.version_dir(2) / "learner.safetensors", "r+b") as f:  # one flipped byte in the live version
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    r = run_cli("status", "--store", str(two_version_store), "--json")
    info = json.loads(r.stdout)
    assert r.returncode == 2 and info["healthy"] is False and info["serving"]["version"] is None
    assert "--version 1" in info["serving"]["reason"]
    states = {v["version"]: v["state"] for v in info["versions"]}
    assert states == {1: "published", 2: "broken"}  # one vocabulary with /v1/versions
    assert "sha256" in next(v["error"] for v in info["versions"] if v["version"] == 2)
    r = run_cli("status", "--store", str(two_version_store))
    assert r.returncode == 2 and "BROKEN" in r.stdout and "a server would serve: nothing new" in r.stdout
    r = run_cli("status", "--store", str(two_version_store), "--fast")  # says it did not verify
    assert r.returncode == 0 and "NOT verified" in r.stdout
    w = ModelWatcher(str(two_version_store), poll_interval_s=60)  # a server (re)started on it: why, and the fix
    try:
        reason = w.status()["reason"]
        assert "live version 2 cannot be served" in reason and "sha256" in reason and "--version 1" in reason
    finally:
        w.stop()


def test_manifest_file_names_must_be_plain_names_in_the_version(two_version_store):
    s = Store(two_version_store)
    path = s.version_dir(2) / "manifest.json"
    original = path.read_text()
    for name in ["/etc/hostname", "../0001/model.onnx", "sub/model.onnx", "..", "manifest.json", ".hidden"]:
        m = json.loads(original)
        target = name if name.startswith("/") else s.version_dir(2) / name
        m["files"][name] = (__import__("hashlib").sha256(open(target, "rb").read()).hexdigest()
                            if os.path.isfile(target) else "0" * 64)
        path.write_text(json.dumps(m))
        with pytest.raises(StoreError, match="broken version 2: manifest.json unreadable: files: .*plain names"):
            s.manifest(2)
    r = run_cli("rollback", "--store", str(two_version_store), "--version", "2")
    assert r.returncode == 2 and "plain names" in r.stderr


@pytest.mark.parametrize("fault", ["export-before-manifest", "export-before-cleanup"])
def test_a_killed_re_export_leaves_every_version_verifiable(two_version_store, fault):
    s = Store(two_version_store)
    old = s.manifest(2)
    r = run_cli("export", "--store", str(two_version_store), "--version", "2", "--opset", "17",
                env={"CL_SERVE_FAULT": fault})
    assert r.returncode == -signal.SIGKILL, r.stderr
    _verifies_all(two_version_store)
    assert run_cli("status", "--store", str(two_version_store)).returncode == 0
    r = run_cli("export", "--store", str(two_version_store), "--version", "2", "--opset", "17")
    assert r.returncode == 0, r.stderr
    _verifies_all(two_version_store)
    new = s.manifest(2)
    assert new.onnx.opset == 17 and new.onnx_file() != "model.onnx" and old.onnx_file() == "model.onnx"
    on_disk = {p.name for p in s.version_dir(2).iterdir()}
    assert on_disk == set(new.files) | {"manifest.json"}  # the old file and every temporary are gone


def test_re_export_never_rewrites_a_file_in_place_and_identical_bytes_change_nothing(two_version_store):
    s = Store(two_version_store)
    r = run_cli("export", "--store", str(two_version_store), "--version", "1", "--opset", "17")
    assert r.returncode == 0, r.stderr
    before = tree_snapshot(two_version_store)
    r = run_cli("export", "--store", str(two_version_store), "--version", "1", "--opset", "17")
    assert r.returncode == 0 and tree_snapshot(two_version_store) == before
    w = ModelWatcher(str(two_version_store), poll_interval_s=60)  # the server loads the file the manifest names
    try:
        assert w.load(1) and w.model.onnx_file == s.manifest(1).onnx_file()
    finally:
        w.stop()


def test_every_writer_cleans_what_crashed_writers_left(two_version_store):
    s = Store(two_version_store)
    leftovers = [two_version_store / ".CURRENT.deadbeef.tmp", s.version_dir(1) / ".manifest.json.cafe0001.tmp",
                 s.version_dir(2) / ".model.export.0badf00d.tmp.partial", two_version_store / "backbone" / ".card.json.1.tmp",
                 s.version_dir(2) / "model.0123456789ab.onnx"]
    for p in leftovers:
        p.write_bytes(b"partial")
    (s.versions_dir / ".tmp-0003-999-abcdef").mkdir()
    r = run_cli("rollback", "--store", str(two_version_store), "--version", "1")
    assert r.returncode == 0, r.stderr
    assert not [p for p in leftovers if p.exists()] and not list(s.versions_dir.glob(".tmp-*"))
    _verifies_all(two_version_store)


@pytest.mark.parametrize("command,hint", [("add-task", "pass --wait"), ("export", "retry when it has finished"),
                                          ("rollback", "pass --wait")])
def test_a_second_writer_is_refused_before_torch_is_imported(two_version_store, tasks, command, hint):
    args = {"add-task": ["--data", str(tasks[2]["train"])], "export": [], "rollback": ["--version", "1"]}[command]
    code = ("import sys; from cl_serve.cli import main; rc = main(sys.argv[1:]); "
            "print('torch imported' if 'torch' in sys.modules else 'torch not imported', rc)")
    with Store(two_version_store).lock():
        r = subprocess.run([sys.executable, "-c", code, command, "--store", str(two_version_store), *args],
                           capture_output=True, text=True, timeout=120)
    assert "locked by another writer" in r.stderr and hint in r.stderr, r.stderr
    assert command == "export" or "--wait" in r.stderr
    assert command != "export" or "--wait" not in r.stderr
    assert r.stdout.split() == ["torch", "not", "imported", "2"], r.stdout


def test_hostile_training_images_are_skipped_as_corrupt_never_a_traceback(tmp_path, tasks, two_version_store):
    data = tmp_path / "task"
    shutil.copytree(tasks[2]["train"], data)
    cls = tasks[2]["classes"][0]
    hostile = {"strip.png": png_header_only(4_000_000, 1), "real-strip.png": encoded_image("PNG", (500_000, 1)),
               "bomb.png": png_header_only(60_000, 60_000), "tall.png": png_header_only(1, 39_000_000),
               "truncated.jpg": encoded_image("JPEG", (640, 480), "RGB")[:300]}
    for name, blob in hostile.items():
        (data / cls / name).write_bytes(blob)
    before = tree_snapshot(two_version_store)
    r = run_cli("add-task", "--store", str(two_version_store), "--data", str(data), "--strict", *CLI_TRAIN)
    assert r.returncode == 2 and "5 corrupt image(s)" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert tree_snapshot(two_version_store) == before
    r = run_cli("add-task", "--store", str(two_version_store), "--data", str(data), "--json", *CLI_TRAIN)
    assert r.returncode == 0, r.stderr
    assert Store(two_version_store).manifest(3).training.corrupt_skipped == 5


def test_symlink_loops_and_dangling_class_folders_are_reported(tmp_path, tasks, two_version_store):
    data = tmp_path / "task"
    shutil.copytree(tasks[2]["train"], data)
    (data / "loop").symlink_to(data / "loop")
    (data / "gone").symlink_to(tmp_path / "missing-dir")
    before = tree_snapshot(two_version_store)
    r = run_cli("add-task", "--store", str(two_version_store), "--data", str(data), *CLI_TRAIN)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "loop (symlink loop" in r.stderr and "gone (dangling symlink" in r.stderr
    assert tree_snapshot(two_version_store) == before


def test_a_restored_version_is_served_again_and_a_deleted_current_is_reported(two_version_store):
    """A refusal lapses when any of the version's files changes: restoring the file makes the version servable
    without a restart. A CURRENT deleted under a serving replica is a store error with the fix, not silence."""
    s = Store(two_version_store)
    onnx = s.version_dir(2) / s.manifest(2).onnx.file
    good = onnx.read_bytes()
    onnx.write_bytes(good[:100] + b"\x00garbage\x00" + good[109:])
    w = ModelWatcher(str(two_version_store), poll_interval_s=60)
    try:
        with pytest.raises(Exception, match="cannot be served"):
            w.load_pinned(2)
        assert w.refusal(2) is not None and w.model is None
        onnx.write_bytes(good)  # the operator restores the file
        assert w.refusal(2) is None
        assert w.load_pinned(2).version == 2
        w.check()
        assert w.model is not None and w.model.version == 2 and w.store_error is None
        (two_version_store / "CURRENT").unlink()
        w.check()
        assert w.model.version == 2  # keeps serving
        assert "CURRENT is missing" in w.store_error and "--version 2" in w.store_error
        assert "CURRENT is missing" in w.status()["store_error"]
    finally:
        w.stop()


def test_each_command_hashes_each_file_once(tmp_path, tasks, monkeypatch):
    """add-task verifies its parent and hashes its own new files once (publish and CURRENT reuse them); export
    verifies the version once although three steps need it verified (it hashed every file 3 times before)."""
    import collections

    import cl_serve.store.model_store as store_module

    hashed = collections.Counter()
    real = store_module.sha256_file
    monkeypatch.setattr(store_module, "sha256_file", lambda p: hashed.update([str(p)]) or real(p))
    store = init_tiny_store(tmp_path / "store", "none")
    pipeline.add_task(store, tasks[0]["train"], fast_train(epochs=1), progress=False)
    first = dict(hashed)
    assert first and max(first.values()) == 1, first
    hashed.clear()
    pipeline.add_task(store, tasks[1]["train"], fast_train(epochs=1), progress=False)
    v1 = {p for p in hashed if "/versions/0001/" in p}
    assert max(hashed.values()) == 1 and {p.rsplit("/", 1)[1] for p in v1} == set(Store(store).manifest(1).files)
    hashed.clear()
    pipeline.export_version(store, 2, opset=17)
    assert hashed and max(hashed.values()) == 1, hashed
    assert {p.rsplit("/", 1)[1] for p in hashed if "/versions/0002/" in p} >= {"learner.safetensors"}
