"""Smoke runs of both benchmarks on tiny generated data: the harness runs end to end and its numbers add up."""
import json
import shutil
from pathlib import Path

import pytest

from benchmarks import cil, report, serving
from benchmarks.metrics import summarize
from tests.conftest import TINY, TINY_MODEL


def test_metrics_follow_the_paper_definitions():
    R = [[0.9], [0.6, 0.8], [0.5, 0.7, 0.9]]
    s = summarize(R, [10, 10, 10])
    assert s["A"] == pytest.approx([0.9, 0.7, 0.7])
    assert s["A_T"] == pytest.approx(0.7) and s["A_avg"] == pytest.approx(23 / 30)
    assert s["forgetting"] == pytest.approx(((0.9 - 0.5) + (0.8 - 0.7)) / 2)


def test_cil_benchmark_smoke(tmp_path, tasks):
    import timm
    from safetensors.torch import save_file

    root = tmp_path / "tasks"
    for t in range(2):
        shutil.copytree(tasks[t]["train"], root / "train" / f"task-{t:02d}")
        shutil.copytree(tasks[t]["test"], root / "test" / f"task-{t:02d}")
    ckpt_dir = tmp_path / "ckpt"
    ckpt_dir.mkdir()
    model = timm.create_model(TINY_MODEL, pretrained=False, num_classes=0, **TINY)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt_dir / "model.safetensors"))
    (ckpt_dir / "card.json").write_text(json.dumps({"timm_model": TINY_MODEL, "timm_kwargs": TINY,
                                                    "mean": [0.5] * 3, "std": [0.5] * 3, "input_size": [3, 32, 32]}))
    config = json.loads((Path(cil.__file__).parent / "cil_config.json").read_text())
    config["frozen_heads"] = {"analytic-M0": {"name": "analytic", "projection": 0}}  # keep the smoke run small
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = tmp_path / "results"
    args = ["--tasks-root", str(root), "--checkpoint", str(ckpt_dir / "model.safetensors"), "--epochs", "1",
            "--runs", "none", "inflora", "sdlora-kd", "joint", "--heads", "task-local", "analytic", "--refit", "inflora",
            "--config", str(tmp_path / "config.json"), "--name", "smoke", "--out-dir", str(out), "--device", "cpu",
            "--test-images", "3"]
    assert cil.main(args) == 0
    res = json.loads((out / "smoke.json").read_text())
    for m in ("none", "inflora", "sdlora-kd"):
        run = res["runs"][m]["0"]
        for h, R in run["R"].items():
            assert len(R) == 2 and len(R[1]) == 2 and 0 <= run["metrics"][h]["A_T"] <= 1, (m, h)
    assert set(res["runs"]["none"]["0"]["metrics"]) == {"task-local", "analytic", "analytic-M0", "simplecil"}
    assert set(res["runs"]["inflora"]["0"]["metrics"]) == {"task-local", "analytic"}
    assert set(res["runs"]["inflora"]["0"]["refit_A_T"]) == {"analytic"}
    assert len(res["runs"]["joint"]["0"]["R"]["analytic"]) == 1 and len(res["runs"]["joint"]["0"]["R"]["analytic"][0]) == 2
    assert res["test_images"] == [3 * 3, 3 * 3] and "forgetting" in res["metric_definitions"]
    assert res["methods"]["inflora"]["expected_tasks"] == 2  # the eps schedule follows the tasks actually run
    # a second invocation resumes: every finished run is kept, nothing is retrained
    before = (out / "smoke.json").read_text()
    assert cil.main(args) == 0 and json.loads((out / "smoke.json").read_text())["runs"] == json.loads(before)["runs"]
    assert report.main(["smoke", str(out)]) == 0
    md = (out / "smoke.md").read_text()
    assert (out / "smoke-accuracy.png").stat().st_size > 0 and "| inflora | analytic |" in md and "| none | simplecil |" in md


@pytest.mark.serving
def test_serving_benchmark_smoke(tmp_path):
    assert serving.main(["--quick", "--name", "smoke", "--out-dir", str(tmp_path), "--requests", "16"]) == 0
    res = json.loads((tmp_path / "smoke.json").read_text())
    assert [r["tasks"] for r in res["cost_vs_tasks"]] == [1, 2]
    assert all(r["errors"] == 0 for r in res["http"]["loads"]) and res["http"]["swap_errors"] == 0
    assert "| vit-tiny-32 | 2 |" in (tmp_path / "smoke.md").read_text()
