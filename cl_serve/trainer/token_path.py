"""A ViT's forward in three parts — embedding, blocks, head — for every timm family we support.

The trainer caches the tokens after the frozen leading blocks and resumes from them (`prefix_tokens`,
`suffix_features`). timm offers `blocks` and `forward_head` on every family, but no public way to embed without
running the blocks or to resume from the middle, and the families' blocks take different side inputs: EVA-02's take
the rotary position embedding (`rope=`), BEiT's a shared relative position bias. Each family is one `TokenPath`;
`token_path(model)` finds the model's, and `check_token_path` proves on random input that prefix + suffix equals the
model's own forward (run at `init`, so a family timm changes under us is refused with one line, not mid-task).

Supported: timm `VisionTransformer` (AugReg, DeiT-3, DINOv2 with or without registers, CLIP with `norm_pre`,
SigLIP's attention pooling, global-average pooling), `Eva` (EVA-02: RoPE, SwiGLU, fused or separate q/k/v) and
`Beit` (relative position bias, q/v biases).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cl_serve.trainer.errors import BackboneError


class TokenPath:
    """How one family embeds an image into tokens and runs a range of its blocks."""

    family = "vit"
    classes: tuple[str, ...] = ("VisionTransformer",)

    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))

    def block_inputs(self, model: nn.Module) -> dict[str, Any]:
        """Side inputs every block takes (none for a plain ViT)."""
        return {}

    def run_blocks(self, model: nn.Module, x: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
        extra = self.block_inputs(model)
        for blk in model.blocks[start:stop]:
            x = blk(x, **extra)
        return x


class EvaPath(TokenPath):
    family = "eva"
    classes = ("Eva",)

    def _rope(self, model: nn.Module):
        if model.rope is None:
            return None
        if hasattr(model.rope, "feat_shape"):
            return model.rope.get_embed()
        return model.rope.get_embed(shape=model.patch_embed.grid_size)

    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if getattr(model, "dynamic_img_size", False):
            raise BackboneError("EVA models built with dynamic_img_size are not supported (fixed input size only)")
        x, _ = model._pos_embed(model.patch_embed(x))  # eval mode: no patch dropout, the rope is the grid's
        return model.norm_pre(x)

    def run_blocks(self, model: nn.Module, x: torch.Tensor, start: int, stop: int | None) -> torch.Tensor:
        rope = self._rope(model)
        mixed = getattr(model, "rope_mixed", False) and rope is not None
        for i, blk in enumerate(model.blocks):
            if i < start or (stop is not None and i >= stop):
                continue
            x = blk(x, rope=rope[i] if mixed else rope)
        return x


class BeitPath(TokenPath):
    family = "beit"
    classes = ("Beit",)

    def embed(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = model.patch_embed(x)
        x = torch.cat((model.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        if model.pos_embed is not None:
            x = x + model.pos_embed
        return model.pos_drop(x)

    def block_inputs(self, model: nn.Module) -> dict[str, Any]:
        return {"shared_rel_pos_bias": model.rel_pos_bias() if model.rel_pos_bias is not None else None}


PATHS: tuple[TokenPath, ...] = (TokenPath(), EvaPath(), BeitPath())
SUPPORTED_CLASSES = tuple(c for p in PATHS for c in p.classes)


def token_path(model: nn.Module) -> TokenPath:
    """The path of the model's family (by its timm class); BackboneError naming the supported ones otherwise."""
    name = type(model).__name__
    for p in PATHS:
        if name in p.classes:
            return p
    raise BackboneError(f"timm {name} models are not supported: cl-serve adapts {', '.join(SUPPORTED_CLASSES)} "
                        "(ViT, DeiT, DINOv2, CLIP, SigLIP, EVA-02, BEiT)")


def prefix_tokens(model: nn.Module, x: torch.Tensor, split: int) -> torch.Tensor:
    """The token sequence after the first `split` transformer blocks (embedding included).

    The blocks before the first adapted one never change, so the trainer runs them once per image view and keeps
    their output; `suffix_features(model, prefix_tokens(model, x, s), s)` equals the model's pre-logit features."""
    path = token_path(model)
    return path.run_blocks(model, path.embed(model, x), 0, split)


def suffix_features(model: nn.Module, tokens: torch.Tensor, split: int) -> torch.Tensor:
    """Pre-logit features from the tokens `prefix_tokens` returned: the remaining blocks, the norm and the pooling."""
    tokens = token_path(model).run_blocks(model, tokens, split, None)
    return model.forward_head(model.norm(tokens), pre_logits=True)


@torch.no_grad()
def check_token_path(model: nn.Module, input_size: int, atol: float = 1e-4) -> None:
    """Prove on random input that prefix + suffix reproduces the model's own forward at every split tried (first,
    middle, last); BackboneError otherwise, so an unsupported model is refused at `init`."""
    path = token_path(model)
    was_training = model.training
    model.eval()
    try:
        x = torch.randn(2, 3, input_size, input_size, generator=torch.Generator().manual_seed(0))
        want = model.forward_head(model.forward_features(x), pre_logits=True)
        depth = len(model.blocks)
        for split in sorted({0, depth // 2, depth}):
            got = suffix_features(model, prefix_tokens(model, x, split), split)
            if got.shape != want.shape or not torch.allclose(got, want, atol=atol, rtol=1e-4):
                raise BackboneError(
                    f"timm {type(model).__name__} ({path.family} path): resuming from the tokens after block {split} "
                    f"does not reproduce the model's forward; this model variant is not supported")
    finally:
        model.train(was_training)
