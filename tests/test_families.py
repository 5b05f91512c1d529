"""Every supported timm family, at a tiny random size (depth 3, width 64, 32 px): each method on all blocks and on the
last two (frozen-prefix cache) learns two tasks and merges into a plain timm model of the same family with the
learner's logits; through `add-task` twice, the ONNX export matches the merged weights and `evaluate` runs; an
unsupported family is refused at `init` with one line.

The ONNX export takes the merged plain model, which is the same kind of object whatever the method, so one export
per family (after an adapter run on the last two blocks, the path with the most moving parts) covers the methods."""
import pytest
import torch

from tests.conftest import fast_train, run_cli

TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 3, "num_heads": 2}
FAMILIES = {
    "augreg": ("vit_small_patch16_224", {}),
    "deit3": ("deit3_small_patch16_224", {}),  # layer scale
    "dinov2": ("vit_small_patch14_dinov2", {}),
    "dinov2-reg": ("vit_small_patch14_reg4_dinov2", {}),  # register tokens
    "clip": ("vit_base_patch16_clip_224", {}),  # norm_pre
    "siglip": ("vit_base_patch16_siglip_224", {}),  # attention pooling, no class token
    "gap": ("vit_medium_patch16_gap_256", {}),  # global average pooling
    "eva02": ("eva02_small_patch14_224", {}),  # RoPE, SwiGLU, fused qkv with q/v biases
    "eva02-separate-qkv": ("eva02_small_patch14_224", {"qkv_fused": False}),  # q_proj, k_proj, v_proj
    "beit": ("beit_base_patch16_224", {}),  # relative position bias, q/v biases
}
METHODS = [("none", None), ("inflora", None), ("inflora", 2), ("sdlora", None), ("sdlora", 2)]


def family_backbone(family: str):
    from cl_serve.trainer.backbone import from_timm

    name, extra = FAMILIES[family]
    spec, weights, prep, _ = from_timm(name, False, {**TINY, **extra}, seed=0)
    return spec, weights, prep


@pytest.mark.parametrize("method,blocks", METHODS, ids=[f"{m}-{'last2' if b else 'all'}" for m, b in METHODS])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_every_method_learns_and_merges_exactly(family, method, blocks, datasets):
    from cl_serve.trainer.learner import Learner
    from cl_serve.trainer.merge import build_plain_model, merged_state_dict
    from cl_serve.trainer.methods import method_config_from_dict
    from cl_serve.trainer.token_path import check_token_path
    from cl_serve.trainer.train import train_task

    spec, weights, prep = family_backbone(family)
    cfg = {"name": method, **({} if method == "none" else {"rank": 4}), **({"blocks": blocks} if blocks else {})}
    learner = Learner(spec, weights, method_config_from_dict(cfg))
    check_token_path(learner.backbone, prep.input_size)
    assert learner.split == (1 if blocks else 0) or method == "none"
    for data in datasets[:2]:  # generated 32-px tasks, decoded once for the suite
        out = train_task(learner, data, prep, fast_train(epochs=3, views=2), progress=False)
        assert out["train_images"] == len(data)
        if blocks and method != "none":  # the steps run the adapted blocks from cached tokens
            assert out["cache"]["frozen_blocks"] == 1 and out["cache"]["views"] == 2
    merged = build_plain_model(spec, merged_state_dict(learner))
    assert type(merged).__name__ == type(learner.backbone).__name__
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (merged(x) - learner(x)).abs().max().item() <= 1e-4
    if method != "none":
        state = merged_state_dict(learner)
        changed = [k for k, v in state.items() if k in weights and not torch.equal(v, weights[k])]
        assert changed and all(k.startswith(("blocks.1.", "blocks.2.")) for k in changed) if blocks else changed


@pytest.mark.parametrize("family", list(FAMILIES))
def test_add_task_twice_exports_and_evaluates(family, tasks, tmp_path):
    from cl_serve.store.open_store import open_store
    from cl_serve.workflow import pipeline

    name, extra = FAMILIES[family]
    store = tmp_path / "store"
    pipeline.init_store(store, method={"name": "inflora", "rank": 4, "blocks": 2}, backbone=name,
                        timm_kwargs={**TINY, **extra})
    pipeline.add_task(store, tasks[0]["train"], fast_train(epochs=1), progress=False, export=False)
    result = pipeline.add_task(store, tasks[1]["train"], fast_train(epochs=1), progress=False)
    assert result.onnx is not None and result.onnx.parity_max_abs_diff <= 1e-4
    manifest = open_store(store).manifest(result.version)
    assert manifest.training.peak_rss_mib > 0 and manifest.training.decode_seconds is not None
    assert manifest.training.heap.startswith("malloc_trim every 2 s")
    report = pipeline.evaluate(store, tasks[1]["seen"])
    assert report["version"] == result.version and len(report["per_task"]) == 2


def test_an_unsupported_family_is_refused_at_init_in_one_line(tmp_path):
    store = tmp_path / "store"
    r = run_cli("init", "--store", str(store), "--backbone", "vit_relpos_small_patch16_224", "--method", "none",
                "--timm-kwargs", '{"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}')
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "not supported" in r.stderr and "EVA-02" in r.stderr
    assert not (store / "store.json").exists()


def test_the_resume_check_refuses_a_path_that_misses_a_side_input(monkeypatch):
    """check_token_path compares prefix + suffix with the model's own forward: an EVA path that forgot the rotary
    embedding (the crash users met) is caught there, at init, instead of training on wrong features."""
    from cl_serve.trainer import token_path
    from cl_serve.trainer.backbone import load_backbone
    from cl_serve.trainer.errors import BackboneError

    spec, weights, _ = family_backbone("eva02")
    model = load_backbone(spec, weights)
    token_path.check_token_path(model, 32)
    monkeypatch.setattr(token_path.EvaPath, "_rope", lambda self, model: None)
    with pytest.raises(BackboneError, match="does not reproduce"):
        token_path.check_token_path(model, 32)
