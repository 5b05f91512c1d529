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
