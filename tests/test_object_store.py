"""The store on object storage: a real S3-compatible server (moto) on 127.0.0.1, the same guarantees as the local
store: complete versions only, CURRENT last, sha256 verified on read, one writer (conditional-PUT lease), crashes
leave the previous version live, and the server's watcher follows it."""
import json
import os
import signal
import time

import pytest

from cl_serve.workflow import pipeline
from cl_serve.base.errors import StoreError
from cl_serve.store.open_store import open_store
from cl_serve.store.model_store import Store
from cl_serve.store.object_backend import open_filesystem
from cl_serve.serving.watcher import ModelWatcher
from cl_serve.serving.launch import free_port
from tests.conftest import TINY, TINY_MODEL, fast_train, run_cli

CLI_TRAIN = ["--epochs", "1", "--batch-size", "16", "--lr", "2e-3", "--device", "cpu"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": endpoint, "FSSPEC_S3_ENDPOINT_URL": endpoint,
           "CL_SERVE_CACHE": str(tmp_path_factory.mktemp("cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="models")
    yield endpoint
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


@pytest.fixture()
def s3_store(s3, tasks, request):
    url = f"s3://models/{request.node.name.replace('[', '-').replace(']', '')}"
    pipeline.init_store(url, method={"name": "none"}, head={"name": "analytic", "projection": 64},
                        backbone=TINY_MODEL, timm_kwargs=TINY)
    pipeline.add_task(url, tasks[0]["train"], fast_train(epochs=1), progress=False)
    return url


def _fresh(url, tmp_path) -> Store:
    """A reader with an empty cache: it sees only what is in the bucket."""
    return open_store(url, cache_dir=tmp_path / f"fresh-{os.urandom(4).hex()}")


def _blobs_and_listed(url, tmp_path) -> tuple[set, set]:
    """The shared content the bucket holds (blobs/<sha256>) and what the versions' manifests list of it."""
    reader = _fresh(url, tmp_path)
    listed = {reader.manifest(v).files[n] for v in reader.versions() for n in reader.manifest(v).shared}
    return set(reader.backend.blobs()), listed


def test_versions_round_trip_through_the_bucket_and_the_watcher_follows(s3_store, tasks, tmp_path):
    reader = _fresh(s3_store, tmp_path)
    assert reader.current() == 1 and reader.versions() == [1]
    assert reader.verified(1).manifest.onnx_file() == "model.onnx"
    watcher = ModelWatcher(s3_store, poll_interval_s=3600)
    try:
        assert watcher.model is not None and watcher.model.version == 1
        pipeline.add_task(s3_store, tasks[1]["train"], fast_train(epochs=1), progress=False)
        watcher.check()
        assert watcher.model.version == 2 and len(watcher.model.labels) == 6
    finally:
        watcher.stop()
    r = run_cli("status", "--store", s3_store, "--json")
    info = json.loads(r.stdout)
    assert r.returncode == 0 and info["serving"] == {"version": 2} and info["verified"]
    assert [v["state"] for v in info["versions"]] == ["published", "live"]
    # Shared content: one object per sha256 under blobs/, none of it under a version's prefix; the two versions
    # share what did not change (the backbone's weights), and a fresh reader loads each from blobs/.
    fs, path = open_filesystem(s3_store)
    m1, m2 = (_fresh(s3_store, tmp_path).verified(v).manifest for v in (1, 2))
    assert m2.onnx.data and set(m2.onnx.data) <= set(m2.shared)
    under_versions = {p.rstrip("/").split("/")[-1] for v in ("0001", "0002") for p in fs.ls(f"{path}/versions/{v}")}
    assert not under_versions & (set(m1.shared) | set(m2.shared))
    common = set(m1.onnx.data) & set(m2.onnx.data)  # the backbone and the projection did not change; the tiny
    assert common == set(m1.onnx.data) and m1.files["model.onnx"] != m2.files["model.onnx"]  # head is in the graph
    blobs, listed = _blobs_and_listed(s3_store, tmp_path)
    assert blobs == listed and len(blobs) < len(m1.shared) + len(m2.shared)


def test_a_second_writer_is_refused_by_the_lease(s3_store, tasks):
    with open_store(s3_store).lock():
        r = run_cli("add-task", "--store", s3_store, "--data", str(tasks[1]["train"]), *CLI_TRAIN, process=True)
    assert r.returncode == 2 and "locked by another writer" in r.stderr and f"pid {os.getpid()}" in r.stderr
    assert open_store(s3_store).versions() == [1]
    r = run_cli("add-task", "--store", s3_store, "--data", str(tasks[1]["train"]), *CLI_TRAIN)  # released
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("fault", ["remote-before-manifest", "remote-before-current"])
def test_a_killed_upload_leaves_the_previous_version_live(s3_store, tasks, tmp_path, fault):
    args = ["add-task", "--store", s3_store, "--data", str(tasks[1]["train"]), *CLI_TRAIN]
    r = run_cli(*args, env={"CL_SERVE_FAULT": fault, "CL_SERVE_LEASE_S": "2"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = run_cli(*args)  # the dead writer's lease has not expired yet
    assert r.returncode == 2 and "locked by another writer" in r.stderr
    time.sleep(2.5)
    reader = _fresh(s3_store, tmp_path)
    assert reader.current() == 1 and reader.verified(1)
    assert reader.versions() == ([1] if fault == "remote-before-manifest" else [1, 2])  # partial: invisible
    r = run_cli(*args)  # the lease has expired: the new writer takes it over, cleans up and publishes
    assert r.returncode == 0, r.stderr
    reader = _fresh(s3_store, tmp_path)
    assert reader.current() == max(reader.versions()) and reader.manifest(reader.current()).parent == 1
    assert not [p for p in reader.backend._glob("versions", "*")
                if not reader.backend.fs.exists(p + "/manifest.json")]  # the partial prefix was removed
    r = run_cli("prune", "--store", s3_store, "--keep", "5", "--yes")  # removes no version, sweeps what the
    assert r.returncode == 0, r.stderr  # killed writer uploaded to blobs/ and no manifest lists
    blobs, listed = _blobs_and_listed(s3_store, tmp_path)
    assert blobs == listed


def test_a_corrupt_object_fails_verification_for_every_reader(s3_store, tmp_path):
    reader = _fresh(s3_store, tmp_path)
    m = reader.manifest(1)
    assert "learner.safetensors" in m.shared  # kept under its sha256: tamper with that object
    reader.backend.fs.pipe_file(reader.backend.path("blobs", m.files["learner.safetensors"]), b"tampered")
    with pytest.raises(StoreError, match="learner.safetensors does not match its sha256"):
        _fresh(s3_store, tmp_path).verified(1)
    r = run_cli("status", "--store", s3_store)
    assert r.returncode == 2 and "BROKEN" in r.stdout


def _upload(local_dir, url):
    import fsspec

    fs, remote = fsspec.core.url_to_fs(url)
    for path in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        fs.put_file(str(path), f"{remote}/{path.relative_to(local_dir).as_posix()}")


def test_inputs_staged_in_the_bucket_are_synchronised_not_just_cached(s3, tasks):
    """A training folder given as a URL is copied locally; changed objects are fetched again, removed ones (a
    whole class too) disappear, and an empty prefix is a clear error."""
    import fsspec

    from cl_serve.base.errors import UserError
    from cl_serve.store.remote_inputs import local_copy
    from cl_serve.trainer.data import scan_image_folder

    source = tasks[1]["train"]
    _upload(source, "s3://models/inputs/week-2")
    copy = local_copy("s3://models/inputs/week-2", progress=False)
    found = scan_image_folder(copy)
    assert {c: len(f) for c, f in found.items()} == {c: len(f) for c, f in scan_image_folder(source).items()}
    first = sorted(source.rglob("*.png"))[0]
    rel = first.relative_to(source).as_posix()
    assert (copy / rel).read_bytes() == first.read_bytes()
    fs, _ = fsspec.core.url_to_fs("s3://models")
    other = sorted(source.rglob("*.png"))[-1].read_bytes()
    with fs.open(f"models/inputs/week-2/{rel}", "wb") as f:  # the same name, new bytes
        f.write(other)
    gone = next(c for c in tasks[1]["classes"] if c != rel.split("/")[0])
    fs.rm(f"models/inputs/week-2/{gone}", recursive=True)
    dead = copy.parent / "partial-99999999"  # what a killed fetch leaves: beside the copy, never inside it
    dead.mkdir()
    (dead / "0").write_bytes(b"half an image")
    copy = local_copy("s3://models/inputs/week-2", progress=False)
    assert not dead.exists() and sorted(p.name for p in copy.parent.iterdir()) == ["index.json", "tree"]
    assert (copy / rel).read_bytes() == other
    assert gone not in scan_image_folder(copy) and not (copy / gone).exists()
    with pytest.raises(UserError, match="nothing under s3://models/inputs/none"):
        local_copy("s3://models/inputs/none")


def test_init_and_add_task_read_the_backbone_and_the_task_from_the_bucket(s3, tasks, tmp_path):
    """`init --checkpoint s3://...` (with its card.json) and `add-task --data s3://... --test-data s3://...`: the
    whole bootstrap and a task without any shared volume, as the object-store deploy overlay runs them."""
    from safetensors.torch import save_file

    from cl_serve.store.open_store import open_store
    from cl_serve.trainer.backbone import from_timm

    staged = tmp_path / "staging"
    (staged / "backbone").mkdir(parents=True)
    _, weights, _, _ = from_timm(TINY_MODEL, False, TINY)
    save_file(weights, str(staged / "backbone" / "model.safetensors"))
    (staged / "backbone" / "card.json").write_text(json.dumps({"timm_model": TINY_MODEL, "timm_kwargs": TINY}))
    _upload(staged, "s3://models/inputs/staging")
    _upload(tasks[0]["train"], "s3://models/inputs/week-1")
    _upload(tasks[0]["test"], "s3://models/inputs/holdout-1")
    store = "s3://models/bucket-only-store"
    r = run_cli("init", "--store", store, "--checkpoint", "s3://models/inputs/staging/backbone/model.safetensors",
                "--method", "none", "--head", "analytic", "--projection", "64")
    assert r.returncode == 0, r.stderr
    r = run_cli("add-task", "--store", store, "--data", "s3://models/inputs/week-1",
                "--test-data", "s3://models/inputs/holdout-1", "--json", *CLI_TRAIN)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["version"] == 1 and sorted(summary["classes_added"]) == sorted(tasks[0]["classes"])
    assert summary["metrics"]["test"]["images"] == 6 * len(tasks[0]["classes"])
    assert _fresh(store, tmp_path).current() == 1 and open_store(store).config().backbone.timm_model == TINY_MODEL


def test_prune_on_a_bucket_hides_first_and_survives_a_kill(s3_store, tasks, tmp_path):
    """On object storage a version is listed by its manifest: prune deletes that first, the rest after. A SIGKILL in
    between leaves a prefix no reader lists; the next prune removes it; a fresh reader sees a green store."""
    for t in (1, 2):
        pipeline.add_task(s3_store, tasks[t]["train"], fast_train(epochs=1), progress=False)
    r = run_cli("prune", "--store", s3_store, "--keep", "1", "--yes", "--allow-rollback-target",
                env={"CL_SERVE_FAULT": "prune-after-hide", "CL_SERVE_LEASE_S": "2"})
    assert r.returncode == -signal.SIGKILL, r.stderr
    time.sleep(2.5)  # the dead writer's lease expires
    reader = _fresh(s3_store, tmp_path)
    assert reader.versions() == [2, 3] and reader.current() == 3  # version 1 is invisible at once
    r = run_cli("prune", "--store", s3_store, "--keep", "1", "--yes", "--allow-rollback-target", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["removed"] == [2]
    fs, path = open_filesystem(s3_store)
    assert sorted(p.rstrip("/").split("/")[-1] for p in fs.ls(f"{path}/versions", refresh=True)) == ["0003"]
    st = json.loads(run_cli("status", "--store", s3_store, "--json").stdout)
    assert st["verified"] and [v["version"] for v in st["versions"]] == [3]
    blobs, listed = _blobs_and_listed(s3_store, tmp_path)
    assert blobs == listed  # the removed versions' content went with them; version 3's stayed


def _count_requests(store) -> list:
    """Every S3 API call this reader's filesystem makes from now on (s3fs sends each through _call_s3)."""
    calls = []
    fs = store.backend.fs
    original = fs._call_s3

    async def counted(method, *args, **kwargs):
        calls.append(getattr(method, "__name__", str(method)))
        return await original(method, *args, **kwargs)

    fs._call_s3 = counted
    return calls


def test_history_costs_the_same_requests_with_2_and_200_versions(s3_store, tmp_path):
    """The first page of /v1/versions and `status --fast` read the versions listing, CURRENT and the history index
    (history.json, rewritten by every writer), not a manifest per version: the same number of S3 requests for a
    store of 2 versions and one of 200 (the others made by copying version 1's manifest, then indexed as a writer
    does). Measured: 5 requests for the first page, 12 for `status --fast`, with 2 and with 200."""
    from cl_serve.serving.history import VersionHistory
    from cl_serve.store.history_index import HistoryIndex
    from cl_serve.workflow import versions as version_commands

    fs, path = open_filesystem(s3_store)
    counts = {}
    for total in (2, 200):
        url = f"{s3_store}-{total}"
        for obj in fs.find(path):
            fs.copy(obj, obj.replace(path, f"{path}-{total}", 1))
        manifest = fs.cat(f"{path}/versions/0001/manifest.json")  # a version is listed by its manifest; these
        fs.pipe({f"{path}-{total}/versions/{v:04d}/manifest.json": manifest  # pages read no other file
                 for v in range(2, total + 1)})
        writer = open_store(url, cache_dir=tmp_path / f"writer-{total}")
        with writer.lock():
            HistoryIndex(writer).write()
        reader = _fresh(url, tmp_path)
        assert reader.versions() == list(range(1, total + 1))
        reader.backend.refresh("history.json")  # what a replica has after its first page: its cached index
        calls = _count_requests(reader)
        page = VersionHistory(reader, lambda v: None, 1.0).page(serving=None, limit=50)
        first_page = len(calls)
        st = version_commands.status(reader, fast=True)
        counts[total] = (first_page, len(calls) - first_page)
        assert [r["version"] for r in page["versions"]] == list(range(total, max(total - 50, 0), -1))
        assert page["total"] == total and len(st["versions"]) == total and st["serving"] == {"version": 1}
    assert counts[2] == counts[200], counts
    assert counts[200][0] <= 5, counts  # CURRENT (HEAD, GET, the listing that checks it), the listing, the index
