"""Task data: validate an ImageFolder directory and decode it once into compact uint8 tensors.

An ImageFolder directory holds one sub-folder per class. Everything is checked before any training starts, so
a bad directory fails with one clear line and nothing is written. Decoded images are kept twice, both uint8:
the training view (shorter side resized to `scale_size`, centre square) that augmentation crops from, and the
evaluation view (`exports.preprocessing.eval_crop`, exactly what the server feeds the model).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from exports.preprocessing import Preprocessing, eval_crop, resize_and_crop, to_uint8_chw
from trainer.errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


@dataclass
class TaskData:
    """One directory's images, decoded: class names in label order and local labels 0..n_classes-1."""

    class_names: list[str]
    train_u8: torch.Tensor  # (N, 3, scale, scale)
    eval_u8: torch.Tensor  # (N, 3, input, input)
    labels: torch.Tensor  # (N,) int64, index into class_names
    corrupt: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.labels.numel())


def scan_image_folder(root: str | Path) -> dict[str, list[Path]]:
    """{class name: image files}, sorted; raises DataError for a missing, empty or class-less directory."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory (expected one sub-folder per class)")
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected ImageFolder layout: {root}/<class>/<image>)")
    found, empty = {}, []
    for c in classes:
        files = sorted(f for f in c.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if files:
            found[c.name] = files
        else:
            empty.append(c.name)
    if empty:
        raise DataError(f"class folder(s) without images in {root}: {', '.join(empty)}")
    return found


def check_new_classes(found: dict[str, list[Path]], known_labels: list[str]) -> None:
    """A task must bring only new classes: list every name the store already has."""
    overlap = sorted(set(found) & set(known_labels))
    if overlap:
        raise DataError(f"{len(overlap)} class(es) already exist in the store: {', '.join(overlap)}")


def check_known_classes(found: dict[str, list[Path]], known_labels: list[str]) -> None:
    """Evaluation data may only name classes the model has learned."""
    unknown = sorted(set(found) - set(known_labels))
    if unknown:
        raise DataError(f"{len(unknown)} test class(es) are unknown to the model: {', '.join(unknown[:20])}")


def _decode(path: Path, p: Preprocessing, train_view: bool):
    try:
        with Image.open(path) as im:
            im.load()
            rgb = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        return None, f"{path}: {type(e).__name__}: {e}"
    ev = eval_crop(rgb, p)
    tr = to_uint8_chw(resize_and_crop(rgb, p.scale_size, p.scale_size, p.interpolation)) if train_view else None
    return (tr, ev), None


def load_task_data(found: dict[str, list[Path]], p: Preprocessing, *, strict: bool = False,
                   train_view: bool = True, class_names: list[str] | None = None) -> TaskData:
    """Decode every image (threads); corrupt files are skipped and reported, or an error with `strict`.

    `class_names` fixes the label order (evaluation against a model's labels); by default the sorted folders.
    """
    names = class_names if class_names is not None else sorted(found)
    index = {n: i for i, n in enumerate(names)}
    jobs = [(f, index[c]) for c in sorted(found) for f in found[c]]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        results = list(pool.map(lambda j: _decode(j[0], p, train_view), jobs))
    corrupt = [err for _, err in results if err]
    if corrupt and strict:
        raise DataError(f"{len(corrupt)} corrupt image(s) (--strict): " + "; ".join(corrupt[:5]))
    ok = [(r, j[1]) for (r, _), j in zip(results, jobs) if r is not None]
    per_class = {index[c]: 0 for c in found}
    for _, y in ok:
        per_class[y] += 1
    unreadable = [names[y] for y, n in per_class.items() if n == 0]
    if unreadable:
        raise DataError(f"class folder(s) without a readable image: {', '.join(unreadable)}")
    train = torch.from_numpy(np.stack([r[0] for r, _ in ok])) if train_view else torch.empty(0, dtype=torch.uint8)
    return TaskData(class_names=names, train_u8=train, eval_u8=torch.from_numpy(np.stack([r[1] for r, _ in ok])),
                    labels=torch.tensor([y for _, y in ok], dtype=torch.int64), corrupt=corrupt)
