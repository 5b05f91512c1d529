"""Learner files written before adapter state moved onto the layers (format 1, tests/fixtures/learner-v1, made at
commit 13d860f on the tiny ViT after two tasks) still load: the same merged deltas and method summary, then they
learn a third task and round-trip in the current format."""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.conftest import fast_train
from cl_serve.trainer.learner import Learner
from cl_serve.trainer.merge import merged_state_dict
from cl_serve.trainer.train import train_task

FIXTURES = Path(__file__).parent / "fixtures" / "learner-v1"
NAMES = ["inflora", "sdlora", "sdlora-per-task", "sdlora-kd", "seq-lora"]


def _read(path: Path):
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("name", NAMES)
def test_a_format_1_learner_file_loads_with_the_same_deltas_and_learns_on(backbone, datasets, name):
    spec, weights, prep = backbone
    tensors, meta = _read(FIXTURES / f"{name}.safetensors")
    assert "format" not in json.loads(meta["cl_serve_learner"])  # really an old file
    expected, expected_meta = _read(FIXTURES / f"{name}.expected.safetensors")
    learner = Learner.from_state(spec, weights, tensors, meta)
    assert learner.method.describe() == json.loads(expected_meta["describe"])
    got = {f"{key}.{t}": layer.merged_delta(t) for key, layer in learner.method.layers.items()
           for t in layer.site.targets}
    assert {k for k, v in got.items() if v is not None} == set(expected)
    for k, want in expected.items():
        assert torch.equal(got[k], want), k  # the same numbers, not merely close

    train_task(learner, datasets[2], prep, fast_train(epochs=1), progress=False)
    saved, saved_meta = learner.state()
    assert json.loads(saved_meta["cl_serve_learner"])["format"] == 2
    again = Learner.from_state(spec, weights, saved, saved_meta)
    a, b = merged_state_dict(learner), merged_state_dict(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_learner_file_from_a_newer_format_is_refused_with_a_clear_error(backbone):
    spec, weights, _ = backbone
    tensors, meta = _read(FIXTURES / "seq-lora.safetensors")
    newer = json.loads(meta["cl_serve_learner"]) | {"format": 99}
    with pytest.raises(ValueError, match="format 99 is newer"):
        Learner.from_state(spec, weights, tensors, {"cl_serve_learner": json.dumps(newer)})


def test_the_fixtures_hold_every_method_family(backbone):
    families = {json.loads(_read(FIXTURES / f"{n}.safetensors")[1]["cl_serve_learner"])["method"]["name"]
                for n in NAMES}
    assert families == {"inflora", "sdlora", "sdlora-kd", "seq-lora"}
