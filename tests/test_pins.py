"""One Ray, one torch, everywhere: requirements.lock, the installed packages, the Dockerfiles and the manifests'
rayVersion agree; the serving image's requirements cover what the server imports; the GPU image's CUDA base
matches the torch build the lock pins."""
import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_ray_is_the_same_in_the_lock_the_venv_the_images_and_the_manifests():
    import ray

    lock = _lock()
    assert lock["ray"] == ray.__version__
    serve_reqs = (ROOT / "deploy" / "requirements-serve.txt").read_text()
    assert f"ray[serve]=={lock['ray']}" in serve_reqs
    for name in ("rayservice.yaml", "rayjob-add-task.yaml"):
        obj = yaml.safe_load((ROOT / "deploy" / "base" / name).read_text())
        cluster = obj["spec"].get("rayClusterConfig") or obj["spec"]["rayClusterSpec"]
        assert cluster["rayVersion"] == lock["ray"], name
    for dockerfile in ("Dockerfile.serve", "Dockerfile.train"):
        assert "-c requirements.lock" in (ROOT / "deploy" / dockerfile).read_text(), dockerfile


def test_the_installed_packages_are_the_locked_ones():
    from importlib.metadata import version

    lock = _lock()
    for name in ("torch", "ray", "onnxruntime-gpu", "timm", "pydantic", "numpy", "fastapi"):
        if name in lock:
            assert version(name) == lock[name], name


def test_the_gpu_image_base_matches_the_locked_torch_cuda_build():
    import torch

    lock = _lock()
    assert torch.__version__.split("+")[0] == lock["torch"]
    cuda = torch.version.cuda  # the CUDA the locked wheel was built for
    base = re.search(r"^FROM nvidia/cuda:(\d+\.\d+)", (ROOT / "deploy" / "Dockerfile.train").read_text(), re.M)
    assert base and cuda and base.group(1) == cuda, (base and base.group(1), cuda)
    assert f"nvidia-cuda-runtime=={lock.get('nvidia-cuda-runtime', '')}".startswith(f"nvidia-cuda-runtime=={cuda}")


def test_the_serving_image_needs_no_torch_and_its_requirements_cover_the_server():
    code = ("import sys, cl_serve.serving.app, cl_serve.serving.launch, cl_serve.cli; "
            "print(sorted({m.split('.')[0] for m in sys.modules}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    loaded = set(eval(out))
    assert "torch" not in loaded and "trainer" not in loaded and "timm" not in loaded
    reqs = {re.split(r"[\[=<>]", line)[0].strip().lower() for line in
            (ROOT / "deploy" / "requirements-serve.txt").read_text().splitlines() if line and not line.startswith("#")}
    import_names = {"ray": "ray", "onnxruntime": "onnxruntime", "pydantic": "pydantic", "numpy": "numpy",
                    "pillow": "PIL", "python-multipart": "multipart"}
    assert {"ray", "onnxruntime", "pydantic", "numpy", "pillow", "python-multipart"} <= reqs
    assert {"ray", "pydantic", "numpy", "PIL"} <= loaded  # what the server really imports is listed
    assert set(import_names) <= reqs


def test_every_image_package_is_pinned_and_every_image_runs_the_tests_python():
    """The serving image installs exactly locked versions (onnxruntime, the CPU build, included), and both images run
    the Python version the lock was resolved with and the tests run on."""
    lock = _lock()
    for line in (ROOT / "deploy" / "requirements-serve.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name = re.split(r"[\[=<>]", line)[0].strip().lower()
            assert name in lock, f"{name} (deploy/requirements-serve.txt) is not pinned in requirements.lock"
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert re.search(rf"^FROM python:{re.escape(here)}-slim", (ROOT / "deploy" / "Dockerfile.serve").read_text(), re.M)
    train = (ROOT / "deploy" / "Dockerfile.train").read_text()
    assert re.search(rf"^FROM python:{re.escape(here)}-slim\S* AS python", train, re.M)
    assert f"python{here} -m venv" in train


def test_the_lock_pins_every_package_the_serving_image_installs():
    """deploy/requirements-serve.txt is installed with `-c requirements.lock`: each package it names has a pin, and
    a version it states is the locked one."""
    from tools.lock import canonical, pins, serve_names

    lock = pins((ROOT / "requirements.lock").read_text().splitlines())
    serve = (ROOT / "deploy" / "requirements-serve.txt").read_text()
    for name in serve_names(serve):
        assert name in lock, f"{name}: the serving image installs it, requirements.lock does not pin it"
    for line in serve.splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            assert lock[canonical(name.split("[")[0])].split("==")[1] == version, line


def test_make_lock_keeps_the_serving_pins_the_venv_does_not_install():
    """A freeze of a Linux venv has onnxruntime-gpu, not the CPU onnxruntime the serving image installs: the new
    lock keeps the old pin of the latter, takes the freeze for the rest, and refuses a serving package nobody pins."""
    import pytest

    from tools.lock import merged_lock, pins

    old = "# h1\n# h2\n# h3\nonnxruntime==1.2.3\nray==2.0\nnumpy==1.0\n"
    frozen = ["ray==2.1", "numpy==1.1", "onnxruntime-gpu==1.2.3", "cl-serve==0.1.0", "-e git+x#egg=cl-serve"]
    new = merged_lock(old, frozen, "ray[serve]==2.1\nonnxruntime\nnumpy\n")
    assert new.splitlines()[:3] == ["# h1", "# h2", "# h3"]
    assert pins(new.splitlines()) == {"onnxruntime": "onnxruntime==1.2.3", "ray": "ray==2.1", "numpy": "numpy==1.1",
                                      "onnxruntime-gpu": "onnxruntime-gpu==1.2.3"}
    with pytest.raises(SystemExit, match="pillow"):
        merged_lock(old, frozen, "pillow\n")
