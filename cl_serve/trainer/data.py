"""Task data: validate an ImageFolder directory and decode it once into compact uint8 tensors.

An ImageFolder directory holds one sub-folder per class. Everything is checked before any training starts, so
a bad directory fails with one clear line and nothing is written. Decoded images are kept twice, both uint8:
the training view (shorter side resized to `scale_size`, centre square) that augmentation crops from, and the
evaluation view (`cl_serve.contract.preprocessing.eval_crop`, exactly what the server feeds the model).
"""
from __future__ import annotations

import errno
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from cl_serve.contract.image_decode import ALLOWED_FORMATS, ImageLimits, ImageRejected, open_bounded
from cl_serve.contract.preprocessing import Preprocessing, eval_crop, resize_and_crop, to_uint8_chw
from cl_serve.trainer.errors import DataError

# The server's size limits (what could not be served is not trained on either); training folders may also hold the
# formats a server refuses by default (GIF, BMP, TIFF, PPM): every format the decoder knows.
TRAIN_IMAGE_LIMITS = ImageLimits(formats=tuple(sorted(ALLOWED_FORMATS)), max_costly_pixels=40_000_000)
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
    """{class name: image files}, sorted; raises DataError for a missing, empty or class-less directory, and for
    entries that cannot be read (a class folder that is a symlink loop or dangling link, an unreadable folder)
    instead of silently dropping them. Symlinked class folders are followed; links inside a class folder are not
    followed into directories (image files that are links are read, and reported as corrupt if broken)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data directory {root} does not exist")
    if not root.is_dir():
        raise DataError(f"{root} is not a directory (expected one sub-folder per class)")
    problems: list[str] = []
    try:
        entries = sorted(p for p in root.iterdir() if not p.name.startswith("."))
    except OSError as e:
        raise DataError(f"cannot list {root}: {e.strerror or e}") from None
    classes = []
    for p in entries:
        try:
            if stat.S_ISDIR(p.stat().st_mode):
                classes.append(p)
        except OSError as e:
            kind = "symlink loop" if e.errno == errno.ELOOP else "dangling symlink" if p.is_symlink() else "unreadable"
            problems.append(f"{p.name} ({kind}: {e.strerror})")
    found, empty = {}, []
    for c in classes:
        files: list[Path] = []

        def walk_error(e: OSError) -> None:
            problems.append(f"{Path(e.filename).relative_to(root) if e.filename else c.name} "
                            f"(unreadable: {e.strerror})")

        for dirpath, dirnames, filenames in os.walk(c, onerror=walk_error):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files += [Path(dirpath) / f for f in filenames
                      if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTENSIONS]
        if files:
            found[c.name] = sorted(files)
        else:
            empty.append(c.name)
    if problems:
        raise DataError(f"{len(problems)} unreadable entr{'y' if len(problems) == 1 else 'ies'} in {root}: "
                        + ", ".join(problems[:10]))
    if not classes:
        raise DataError(f"{root} has no class sub-folders (expected ImageFolder layout: {root}/<class>/<image>)")
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
        rgb = open_bounded(path, TRAIN_IMAGE_LIMITS, min_side=p.scale_size)
    except ImageRejected as e:
        return None, f"{path}: {e.message}"
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
