"""Smoke runs of both benchmarks on tiny generated data: the harness runs end to end and its numbers add up."""
import json
import shutil

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
    out = tmp_path / "results"
    assert cil.main(["--tasks-root", str(root), "--checkpoint", str(ckpt_dir / "model.safetensors"), "--epochs", "1",
                     "--methods", "inflora", "sdlora-kd", "joint", "simplecil", "--name", "smoke", "--out-dir", str(out),
                     "--device", "cpu", "--test-images", "3"]) == 0
    res = json.loads((out / "smoke.json").read_text())
    for m in ("inflora", "sdlora-kd", "simplecil"):
        run = res["runs"][m]["0"]
        assert len(run["R"]) == 2 and len(run["R"][1]) == 2 and 0 <= run["A_T"] <= 1
    assert len(res["runs"]["joint"]["0"]["R"]) == 1
    assert res["test_images"] == [3 * 3, 3 * 3] and "forgetting" in res["metric_definitions"]
    assert res["methods"]["inflora"]["expected_tasks"] == 2  # the eps schedule follows the tasks actually run
    assert report.main(["smoke", str(out)]) == 0
    assert (out / "smoke-accuracy.png").stat().st_size > 0 and "| inflora |" in (out / "smoke.md").read_text()


@pytest.mark.serving
def test_serving_benchmark_smoke(tmp_path):
    assert serving.main(["--quick", "--name", "smoke", "--out-dir", str(tmp_path), "--requests", "16"]) == 0
    res = json.loads((tmp_path / "smoke.json").read_text())
    assert [r["tasks"] for r in res["cost_vs_tasks"]] == [1, 2]
    assert all(r["errors"] == 0 for r in res["http"]["loads"]) and res["http"]["swap_errors"] == 0
    assert "| vit-tiny-32 | 2 |" in (tmp_path / "smoke.md").read_text()
