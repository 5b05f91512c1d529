"""Learner files written before adapter state moved onto the layers (format 1) still load.

The format-1 files are written here, from a learner trained in the test, by `write_format_1`: the tensor names
the methods built by hand before the change (commit 13d860f: InfLoRA `inflora.<site>.B_last`, `.memory`,
`.memory_is_complement`, `.<target>.delta`; SD-LoRA `sdlora.<site>.<target>.<NNN>.t<k>.B/.A/.scale/.alpha` and
`sdlora.alpha.task__t<k>`; seq-LoRA `seqlora.<site with _>__<target>.A/.B`; no `format` in the header). Loading one
must give the same merged deltas, bit for bit, and the same method summary; it then learns a third task and
round-trips in the current format."""
import json

import pytest
import torch

from tests.conftest import fast_train
from cl_serve.trainer.learner import Learner
from cl_serve.trainer.merge import merged_state_dict
from cl_serve.trainer.methods import method_config_from_dict
from cl_serve.trainer.train import train_task

ALL = ["q", "k", "v", "proj", "fc1", "fc2"]
CONFIGS = {  # every method family; InfLoRA's high threshold makes some memories switch to the complement basis
    "inflora": {"name": "inflora", "rank": 4, "targets": ALL, "expected_tasks": 2, "eps0": 0.999},
    "sdlora": {"name": "sdlora", "rank": 4, "targets": ALL},
    "sdlora-per-task": {"name": "sdlora", "rank": 4, "targets": ["q", "v"], "magnitudes": "per-task"},
    "sdlora-kd": {"name": "sdlora-kd", "rank": 4, "targets": ["q", "v"], "kd_tau": 10.0},
    "seq-lora": {"name": "seq-lora", "rank": 4, "targets": ["q", "v"], "blocks": 1},
}


def write_format_1(learner: Learner) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The learner's state as a format-1 learner.safetensors held it (names and shapes of commit 13d860f)."""
    tensors, meta = learner.state()
    header = json.loads(meta["cl_serve_learner"])
    del header["format"]
    old = {k: v for k, v in tensors.items() if k.startswith("head.")}
    method = learner.method
    for key, layer in method.layers.items():
        state = layer.adapter_state()
        if method.config.family == "inflora":
            old[f"inflora.{key}.B_last"] = state["B"]
            old[f"inflora.{key}.memory"] = state["memory"]
            old[f"inflora.{key}.memory_is_complement"] = state["memory_is_complement"].reshape(1)
            for t in layer.site.targets:
                old[f"inflora.{key}.{t}.delta"] = state[f"folded.{t}"]
        elif method.config.family == "sdlora":
            for t in layer.site.targets:
                for n, d in enumerate(layer.directions[t]):
                    base = f"sdlora.{key}.{t}.{n:03d}.t{d.task_id}"
                    old[f"{base}.B"], old[f"{base}.A"] = d.B, d.A
                    old[f"{base}.scale"] = d.scale.reshape(1)
                    if d.alpha is not None:
                        old[f"{base}.alpha"] = d.alpha.detach().reshape(1)
        else:
            for t in layer.A:
                old[f"seqlora.{key.replace('.', '_')}__{t}.A"] = state[f"A.{t}"]
                old[f"seqlora.{key.replace('.', '_')}__{t}.B"] = state[f"B.{t}"]
    if getattr(method, "shared", None) is not None:
        for name, p in method.shared.alpha.items():
            old[f"sdlora.alpha.task__{name}"] = p.detach().reshape(1)
    assert not any(k.startswith(("method.", "blocks.")) for k in old)  # nothing in the current names
    return {k: v.detach().cpu().contiguous() for k, v in old.items()}, {"cl_serve_learner": json.dumps(header)}


def _deltas(learner: Learner) -> dict[str, torch.Tensor]:
    return {f"{key}.{t}": d for key, layer in learner.method.layers.items() for t in layer.site.targets
            if (d := layer.merged_delta(t)) is not None}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_a_format_1_learner_file_loads_with_the_same_deltas_and_learns_on(backbone, datasets, name):
    spec, weights, prep = backbone
    torch.manual_seed(1)
    trained = Learner(spec, weights, method_config_from_dict(CONFIGS[name]))
    for data in datasets[:2]:
        train_task(trained, data, prep, fast_train(epochs=1), progress=False)
    want = _deltas(trained)
    assert want and all(d.abs().sum() > 0 for d in want.values())  # something was learned to compare
    if name == "inflora":  # both memory kinds are exercised
        kinds = {bool(layer.memory_is_complement[0]) for layer in trained.method.layers.values()}
        assert kinds == {True, False}, kinds

    tensors, meta = write_format_1(trained)
    learner = Learner.from_state(spec, weights, tensors, meta)
    assert learner.method.describe() == trained.method.describe()
    got = _deltas(learner)
    assert got.keys() == want.keys()
    for k, d in want.items():
        assert torch.equal(got[k], d), k  # the same numbers, not merely close

    train_task(learner, datasets[2], prep, fast_train(epochs=1), progress=False)
    saved, saved_meta = learner.state()
    assert json.loads(saved_meta["cl_serve_learner"])["format"] == 2
    again = Learner.from_state(spec, weights, saved, saved_meta)
    a, b = merged_state_dict(learner), merged_state_dict(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_learner_file_from_a_newer_format_is_refused_with_a_clear_error(backbone):
    spec, weights, _ = backbone
    learner = Learner(spec, weights, method_config_from_dict(CONFIGS["seq-lora"]))
    tensors, meta = learner.state()
    newer = json.loads(meta["cl_serve_learner"]) | {"format": 99}
    with pytest.raises(ValueError, match="format 99 is newer"):
        Learner.from_state(spec, weights, tensors, {"cl_serve_learner": json.dumps(newer)})
