"""Shared fixtures: a tiny ViT (2 blocks, width 32, 32x32 input), generated task data, store builders."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cl_serve.trainer.synthetic import class_names, write_image_folder

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_MODEL = "vit_tiny_patch16_224"
N_TASKS, PER_TASK = 4, 3


SLOW_MODULES = {"test_server", "test_ray_train", "test_object_store"}  # Ray Serve, Ray Train, an S3 server
# Real multi-process Ray clusters: `make test-cluster` (CI runs it after `make test`, which leaves them out to stay
# within 10 minutes on 2 cores).
CLUSTER_MODULES = {"test_ray_train", "test_gcs_fault_tolerance"}


def pytest_collection_modifyitems(config, items):
    """`slow` (left out by `make test-fast`): tests that start Ray or an S3 server, and tests that run a fresh
    process (fault injection that kills it, a second process meeting a lock, `python -c` import checks)."""
    import inspect
    import re

    for item in items:
        try:
            src = inspect.getsource(item.function)
        except (AttributeError, OSError, TypeError):
            src = ""
        if (item.module.__name__.rsplit(".", 1)[-1] in SLOW_MODULES or item.get_closest_marker("serving")
                or re.search(r"process=True|env=|subprocess\.|Popen|real_ray_cluster", src + item.name)):
            item.add_marker(pytest.mark.slow)
        if item.module.__name__.rsplit(".", 1)[-1] in CLUSTER_MODULES or "real_ray_cluster" in item.name:
            item.add_marker(pytest.mark.cluster)


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same random state, whichever tests ran before it (no order dependence)."""
    import random

    random.seed(0)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(0)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(0)
    yield


@pytest.fixture(scope="session")
def tasks(tmp_path_factory) -> list[dict]:
    """Four tasks of three generated classes: train dir, test dir, cumulative test dir."""
    root = tmp_path_factory.mktemp("tasks")
    names = class_names(N_TASKS * PER_TASK)
    out = []
    for t in range(N_TASKS):
        cls = names[t * PER_TASK:(t + 1) * PER_TASK]
        train = write_image_folder(root / f"train{t}", cls, 16, seed=t)
        test = write_image_folder(root / f"test{t}", cls, 6, seed=100 + t)
        seen = root / f"seen{t}"
        seen.mkdir()
        for j in range(t + 1):
            for c in (root / f"test{j}").iterdir():
                (seen / c.name).symlink_to(c)
        out.append({"train": train, "test": test, "seen": seen, "classes": cls})
    return out


@pytest.fixture(scope="session")
def backbone():
    """(spec, weights, preprocessing) of a randomly initialised tiny ViT, shared by the trainer-level tests."""
    import torch

    from cl_serve.trainer.backbone import from_timm

    torch.manual_seed(0)  # the same random backbone whichever test asks first
    spec, weights, prep, _ = from_timm(TINY_MODEL, False, TINY)
    return spec, weights, prep


@pytest.fixture(scope="session")
def datasets(tasks, backbone):
    """The generated tasks' training data, decoded."""
    from cl_serve.trainer.data import load_task_data, scan_image_folder

    return [load_task_data(scan_image_folder(t["train"]), backbone[2]) for t in tasks]


def method_dict(name: str, **kw) -> dict:
    return {"name": name, **({} if name == "none" else {"rank": 4}), **kw}


def init_tiny_store(path: Path, method: str = "inflora", **kw) -> Path:
    from cl_serve.workflow import pipeline

    pipeline.init_store(path, method=method_dict(method, **kw), backbone=TINY_MODEL, timm_kwargs=TINY)
    return path


def fast_train(**kw):
    from cl_serve.trainer.train import TrainConfig

    return TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 2e-3, "device": "cpu", **kw})


def run_cli(*args: str, env: dict | None = None, timeout: float = 300, process: bool = False
            ) -> subprocess.CompletedProcess:
    """`cl-serve ARGS`: in this process (stdout, stderr and the exit code captured as a subprocess would report
    them), or in a fresh Python process when it matters: `env` (fault injection kills the process) or `process`
    (another process than the test's, e.g. to meet a lock the test holds)."""
    if env is not None or process:
        return subprocess.run([sys.executable, "-m", "cl_serve.cli", *args], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})})
    import contextlib
    import io
    import traceback

    from cl_serve.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(list(args))
        except SystemExit as e:  # argparse's usage errors
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except Exception:  # what a subprocess would print before exiting 1
            traceback.print_exc()
            rc = 1
    return subprocess.CompletedProcess(["cl-serve", *args], rc, out.getvalue(), err.getvalue())


def tree_snapshot(root: Path) -> dict:
    """Every file under root (except the lock) with its bytes' hash: 'the store is unchanged'."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def copy_store(src: Path, dst: Path) -> Path:
    """A copy of a local store that keeps its hard links (its shared content stays shared, as in the original)."""
    import subprocess

    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def disk_bytes(*roots: Path) -> int:
    """The bytes directory trees hold on disk: each file (inode) counted once, however many names it has."""
    seen: dict[tuple, int] = {}
    for p in (p for root in roots for p in root.rglob("*")):
        st = p.lstat()
        if p.is_file() and not p.is_symlink():
            seen[(st.st_dev, st.st_ino)] = st.st_size
    return sum(seen.values())


class StalledUploads:
    """`with StalledUploads(host, port, token) as s:` opens `n` connections that send the headers of POST /classify
    (Content-Length 1000) and one body byte, then stall; `s.statuses()` waits for each one's answer (the status
    code as bytes; the server should send 408 when its body_timeout_s passes)."""

    def __init__(self, host: str, port: int, token: str, n: int = 64):
        self.address, self.n = (host, int(port)), n
        self.head = (f"POST /classify HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{").encode()
        self.socks: list = []

    def __enter__(self) -> "StalledUploads":
        import socket

        for _ in range(self.n):
            s = socket.create_connection(self.address, timeout=30)
            self.socks.append(s)
            s.sendall(self.head)
        return self

    def statuses(self) -> list[bytes]:
        out = []
        for s in self.socks:
            s.settimeout(30)
            out.append(b"".join(s.recv(64).split(b" ")[1:2]))
        return out

    def __exit__(self, *exc) -> None:
        for s in self.socks:
            s.close()


def scrape_metrics(url: str) -> dict[str, float]:
    """cl-serve's metrics on Ray's Prometheus endpoint (`ray_cl_serve_*`), by name and labels, summed over repeats."""
    import httpx

    out: dict[str, float] = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        if line.startswith("ray_cl_serve_"):
            name, value = line.rsplit(" ", 1)
            out[name] = out.get(name, 0.0) + float(value)
    return out


def metric_total(metrics: dict[str, float], prefix: str, must: str = "") -> float:
    """The sum of the scraped series whose name starts with `prefix` and whose labels contain `must`."""
    return sum(v for k, v in metrics.items() if k.startswith(prefix) and must in k)
