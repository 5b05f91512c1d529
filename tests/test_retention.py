"""`cl-serve prune`: a dry run by default; removes old versions under the lock, never the live, the newest, the
canary's candidate or the newest rollback target unless told; every kept version still verifies; a crash between
hiding a version and deleting its files leaves nothing a reader would load; a server keeps serving through it."""
import json
from datetime import timedelta

import pytest

from tests.conftest import copy_store, disk_bytes, fast_train, init_tiny_store, run_cli, tree_snapshot


@pytest.fixture(scope="module")
def five_versions(tmp_path_factory, tasks):
    """Versions 1-4 of a tiny store, from tasks 0-3 (no release gate: every version went live in turn)."""
    from cl_serve.workflow import pipeline

    root = tmp_path_factory.mktemp("prune") / "store"
    init_tiny_store(root, method="none")
    for t in range(4):
        pipeline.add_task(root, tasks[t]["train"], fast_train(epochs=1), progress=False)
    return root


def _copy(src, dst):
    return copy_store(src, dst)


def test_the_plan_protects_live_newest_candidate_and_rollback_target():
    from types import SimpleNamespace

    from cl_serve.workflow.retention import plan

    gate = lambda passed: SimpleNamespace(passed=passed)  # noqa: E731
    manifests = {1: gate(True), 2: gate(True), 3: gate(True), 4: gate(True), 5: gate(False), 6: gate(False),
                 7: None}
    store = SimpleNamespace(versions=lambda: list(range(1, 8)), current=lambda: 4,
                            manifest=lambda v: SimpleNamespace(gate=manifests[v], created_at="2026-01-01T00:00:00Z"))
    p = plan(store, keep=1, older_than=None, allow=set())
    assert p["remove"] == [1, 2, 5]  # 3: rollback target, 4: live, 6: canary candidate, 7: newest
    assert p["kept"] == {3: "newest rollback target", 4: "live", 6: "canary candidate",
                         7: "newest (numbers are never reused)"}
    p = plan(store, keep=1, older_than=None, allow={"canary candidate", "newest rollback target"})
    assert p["remove"] == [1, 2, 3, 5, 6]
    assert plan(store, keep=3, older_than=None, allow=set())["remove"] == [1, 2]
    young = plan(store, keep=None, older_than=timedelta(days=10**5), allow=set())
    assert young["remove"] == [] and young["kept"][1] == "newer than --older-than"


def test_prune_is_a_dry_run_unless_told_and_keeps_every_kept_version_verifiable(five_versions, tmp_path):
    root = _copy(five_versions, tmp_path / "store")
    before = tree_snapshot(root)
    r = run_cli("prune", "--store", str(root), "--keep", "1")
    assert r.returncode == 0, r.stderr
    assert "would remove version 1" in r.stdout and "dry run: nothing was removed" in r.stdout
    assert tree_snapshot(root) == before
    held = disk_bytes(root / "versions", root / "blobs")
    r = run_cli("prune", "--store", str(root), "--keep", "1", "--yes", "--json")
    out = json.loads(r.stdout)
    assert out["removed"] == [1, 2]  # 3: rollback target, 4: live and newest
    assert out["bytes_freed"] == held - disk_bytes(root / "versions", root / "blobs") > 0
    assert sorted(p.name for p in (root / "versions").iterdir()) == ["0003", "0004"]
    st = json.loads(run_cli("status", "--store", str(root), "--json").stdout)
    assert st["verified"] and [v["state"] for v in st["versions"]] == ["published", "live"]
    for bad, message in ((["--keep", "0"], "at least 1"), (["--older-than", "3 weeks"], "a number and a unit"),
                         ([], "say what to remove")):
        r = run_cli("prune", "--store", str(root), *bad)
        assert r.returncode == 2 and message in r.stderr, (bad, r.stderr)


def test_a_crash_between_hiding_and_deleting_leaves_no_half_version(five_versions, tmp_path):
    """SIGKILL right after a version is hidden: no reader lists it, the store is green, and the next writer removes
    the leftover files."""
    root = _copy(five_versions, tmp_path / "store")
    r = run_cli("prune", "--store", str(root), "--keep", "1", "--yes", env={"CL_SERVE_FAULT": "prune-after-hide"})
    assert r.returncode != 0
    from cl_serve.store.model_store import Store

    s = Store(root)
    assert 1 not in s.versions() and s.current() == 4
    leftovers = list((root / "versions").glob(".pruned-*"))
    assert len(leftovers) == 1
    st = json.loads(run_cli("status", "--store", str(root), "--json").stdout)
    assert st["verified"], st
    r = run_cli("prune", "--store", str(root), "--keep", "1", "--yes")
    assert r.returncode == 0 and not list((root / "versions").glob(".pruned-*"))
    assert s.versions() == [3, 4]


def test_a_serving_watcher_keeps_its_model_while_older_versions_are_pruned(five_versions, tmp_path):
    from cl_serve.serving.model import BadInput
    from cl_serve.serving.watcher import ModelWatcher
    from cl_serve.workflow import retention, versions

    root = _copy(five_versions, tmp_path / "store")
    versions.rollback(root, 2)
    w = ModelWatcher(str(root), poll_interval_s=3600)
    try:
        assert w.model.version == 2
        versions.rollback(root, 4)  # the server has not polled yet: it still serves 2
        r = retention.prune(root, keep=1, apply=True, allow=("newest rollback target",))
        assert 2 in r["removed"]
        assert w.model.version == 2  # what it has loaded keeps answering
        import numpy as np

        x = np.zeros((1, 3, 32, 32), np.float32)
        assert w.model.run(x).shape[0] == 1
        w.check()  # the next poll moves to the live version
        assert w.model.version == 4
        with pytest.raises(BadInput) as e:
            w.load_pinned(2)
        assert e.value.status == 404
    finally:
        w.stop()
