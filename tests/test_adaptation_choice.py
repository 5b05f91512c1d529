"""Drift transport of the analytic head's statistics, and `--method auto` (cl_serve.trainer.heads.drift, cl_serve.trainer.auto)."""
import json

import pytest
import torch
from torch import nn

from tests.conftest import TINY, TINY_MODEL, fast_train


def test_drift_map_recovers_an_affine_change_and_leaves_uncovered_directions_alone():
    from cl_serve.trainer.heads.drift import fit_drift

    gen = torch.Generator().manual_seed(0)
    d = 8
    a = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    x = torch.randn(400, d, generator=gen, dtype=torch.float64)
    m = fit_drift(x, x @ a.T + b, ridge=1e-9)
    assert torch.allclose(m.A, a, atol=1e-5) and torch.allclose(m.b, b, atol=1e-5) and m.fit_r2 > 0.999
    # the current task's features span only the first 4 directions: the others are assumed not to move
    x4 = torch.cat([x[:, :4], torch.zeros(400, d - 4, dtype=torch.float64)], 1)
    m4 = fit_drift(x4, x4 * 2.0, ridge=1e-6)
    assert torch.allclose(m4.A[4:, 4:], torch.eye(d - 4, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(torch.diagonal(m4.A)[:4], torch.full((4,), 2.0, dtype=torch.float64), atol=1e-3)
    with pytest.raises(ValueError, match="same images"):
        fit_drift(x, x[:10])


def test_analytic_head_without_projection_transports_exactly_under_a_linear_drift():
    """For M = 0, the moved statistics equal the sums recomputed on the moved features (the head's stated claim)."""
    from cl_serve.trainer.heads import build_head, head_config_from_dict
    from cl_serve.trainer.heads.drift import DriftMap

    gen = torch.Generator().manual_seed(1)
    d = 6
    head = build_head(head_config_from_dict({"name": "analytic", "projection": 0, "drift": "transport"}), d)
    f = torch.randn(60, d, generator=gen)
    y = torch.arange(3).repeat_interleave(20)
    head.end_task(f, y, nn.Linear(d, 3))
    a = torch.eye(d, dtype=torch.float64) + 0.2 * torch.randn(d, d, generator=gen, dtype=torch.float64)
    b = torch.randn(d, generator=gen, dtype=torch.float64)
    out = head.transport(DriftMap(a, b, 1.0, 0.0))
    assert out["transported"]
    moved = f.double() @ a.T + b
    assert torch.allclose(head.G, moved.T @ moved, atol=1e-8)
    assert torch.allclose(head.Q, moved.T @ nn.functional.one_hot(y, 3).double(), atol=1e-8)
    ignoring = build_head(head_config_from_dict({"name": "analytic", "projection": 0, "drift": "ignore"}), d)
    ignoring.end_task(f, y, nn.Linear(d, 3))
    G = ignoring.G.clone()
    assert not ignoring.transport(DriftMap(a, b, 1.0, 0.0))["transported"] and torch.equal(ignoring.G, G)


def test_method_auto_decides_on_the_first_task_records_why_and_keeps_the_winner(tmp_path, tasks):
    from cl_serve.workflow import pipeline
    from cl_serve.store.open_store import open_store

    store = tmp_path / "s"
    pipeline.init_store(store, method={"name": "auto", "candidate": {"name": "inflora", "rank": 4, "adapt_tasks": 1},
                                       "projections": [0, 32]},
                        head={"name": "analytic"}, backbone=TINY_MODEL, timm_kwargs=TINY)
    r = pipeline.add_task(store, tasks[0]["train"], fast_train(), progress=False, export=False)
    auto = r.auto
    assert {(row["method"], row["projection"]) for row in auto["rows"]} == {
        ("none", 0), ("none", 32), ("inflora", 0), ("inflora", 32)}
    assert auto["fit_images"] + auto["held_out_images"] == 3 * 16 and auto["held_out_images"] == 3 * 4
    chosen = auto["chosen"]
    best = {k: max(row["held_out_accuracy"] for row in auto["rows"] if row["adapted"] == k) for k in (False, True)}
    assert chosen["adapter_held_out_accuracy"] == best[True] and chosen["frozen_held_out_accuracy"] == best[False]
    assert (chosen["method"] == "inflora") == (best[True] >= best[False] + auto["margin"])
    m = open_store(store).manifest(r.version)
    assert m.method.name == chosen["method"] and m.method.chosen_by["chosen"] == chosen
    assert m.head.projection == chosen["projection"]
    # the next task trains the winner from the parent version: no second choice
    r2 = pipeline.add_task(store, tasks[1]["train"], fast_train(), progress=False, export=False)
    assert r2.auto is None and r2.method == chosen["method"]
    assert open_store(store).manifest(r2.version).head.projection == chosen["projection"]
    assert json.loads((store / "store.json").read_text())["method"]["name"] == "auto"


def test_method_auto_settings_are_validated(tmp_path):
    from cl_serve.workflow import pipeline
    from cl_serve.base.errors import UserError

    for bad, msg in [({"candidate": {"name": "none"}}, "candidate"), ({"projections": [-1]}, "projections"),
                     ({"holdout": 1.5}, "holdout")]:
        with pytest.raises(UserError, match=msg):
            pipeline.init_store(tmp_path / "s", method={"name": "auto", **bad}, backbone=TINY_MODEL, timm_kwargs=TINY)
        assert not (tmp_path / "s" / "store.json").exists()
