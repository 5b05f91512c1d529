"""The preprocessing contract between training and serving, in PIL + numpy only (no torch).

A version's manifest records a `Preprocessing`; the trainer's evaluation and the server both call
`preprocess_image`, so the served model sees exactly the pixels the accuracy was measured on:
resize the shorter side to `scale_size`, centre-crop `input_size`, scale to [0, 1], normalise by mean/std.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


class Preprocessing(BaseModel):
    """How a raw image becomes the model's input tensor (recorded in every manifest and ONNX file)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_size: int = Field(gt=0, description="square model input side, in pixels")
    scale_size: int = Field(gt=0, description="the shorter side is resized to this before the centre crop")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["nearest", "bilinear", "bicubic"] = "bicubic"

    @model_validator(mode="after")
    def _check(self) -> "Preprocessing":
        if self.scale_size < self.input_size:
            raise ValueError(f"scale_size ({self.scale_size}) must be >= input_size ({self.input_size})")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self

    @classmethod
    def from_crop_pct(cls, input_size: int, crop_pct: float, mean, std, interpolation: str = "bicubic"):
        """timm's convention: scale_size = floor(input_size / crop_pct)."""
        return cls(input_size=input_size, scale_size=int(input_size / crop_pct), mean=tuple(mean),
                   std=tuple(std), interpolation=interpolation if interpolation in _RESAMPLE else "bicubic")


def resize_shorter(img: Image.Image, size: int, interpolation: str) -> Image.Image:
    """RGB image with its shorter side resized to `size` (aspect kept)."""
    if img.mode != "RGB":  # convert() always copies: a second full-size buffer for an RGB image
        img = img.convert("RGB")
    w, h = img.size
    if min(w, h) == size:
        return img
    if w <= h:
        nw, nh = size, max(size, round(h * size / w))
    else:
        nw, nh = max(size, round(w * size / h)), size
    return img.resize((nw, nh), _RESAMPLE[interpolation])


def resize_and_crop(img: Image.Image, size: int, crop: int, interpolation: str) -> Image.Image:
    """RGB image, shorter side resized to `size`, then the centre `crop` x `crop` square."""
    img = resize_shorter(img, size, interpolation)
    w, h = img.size
    left, top = (w - crop) // 2, (h - crop) // 2
    return img.crop((left, top, left + crop, top + crop))


def train_square(img: Image.Image, p: Preprocessing) -> Image.Image:
    """The training view: the shorter side resized to `scale_size`, then a `scale_size` square placed so that its
    centre `input_size` crop (at `eval_offset`) is exactly the evaluation view. The trainer keeps only this square
    per image and cuts the evaluation view out of it."""
    img = resize_shorter(img, p.scale_size, p.interpolation)
    w, h = img.size
    o = eval_offset(p)
    left, top = (w - p.input_size) // 2 - o, (h - p.input_size) // 2 - o
    return img.crop((left, top, left + p.scale_size, top + p.scale_size))


def eval_offset(p: Preprocessing) -> int:
    """Where the evaluation view starts inside the training square (`train_square`), on both axes."""
    return (p.scale_size - p.input_size) // 2


def to_uint8_chw(img: Image.Image) -> np.ndarray:
    """(3, H, W) uint8 array of an RGB image."""
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def eval_crop(img: Image.Image, p: Preprocessing) -> np.ndarray:
    """The evaluation view of an image as uint8 (3, input, input), before normalisation."""
    return to_uint8_chw(resize_and_crop(img, p.scale_size, p.input_size, p.interpolation))


def normalize(batch_u8: np.ndarray, p: Preprocessing) -> np.ndarray:
    """uint8 (N, 3, H, W) -> float32 normalised, the same arithmetic as the torch side."""
    mean = np.asarray(p.mean, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(p.std, np.float32).reshape(1, 3, 1, 1)
    return (batch_u8.astype(np.float32) / np.float32(255.0) - mean) / std


def preprocess_image(img: Image.Image, p: Preprocessing) -> np.ndarray:
    """One decoded image -> float32 (3, input, input), ready for the model."""
    return normalize(eval_crop(img, p)[None], p)[0]
