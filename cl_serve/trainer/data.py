"""Task data: validate an ImageFolder directory and decode it, streaming, into a disk-backed uint8 cache.

An ImageFolder directory holds one sub-folder per class. Everything is checked before any training starts, so
a bad directory fails with one clear line and nothing is written. Each image is decoded once into its training
square (`cl_serve.contract.preprocessing.train_square`: `scale_size` pixels a side, placed so that its centre
`input_size` crop is exactly the evaluation view the server feeds the model). The squares go, a batch at a time,
into an unlinked temporary file (`DecodedImages`): the process's memory does not grow with the number of images,
and nothing is left on disk when the process ends, however it ends. Readers take batches (`images[i:j]`,
`images[index_tensor]`) and lazy views (`subset`, `center_crop`).
"""
from __future__ import annotations

import errno
import os
import stat
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from cl_serve.base.progress import progress as progress_reporter
from cl_serve.contract.image_decode import ALLOWED_FORMATS, ImageLimits, ImageRejected, open_bounded
from cl_serve.contract.preprocessing import Preprocessing, eval_crop, eval_offset, to_uint8_chw, train_square
from cl_serve.trainer.errors import DataError

# The server's size limits (what could not be served is not trained on either); training folders may also hold the
# formats a server refuses by default (GIF, BMP, TIFF, PPM): every format the decoder knows.
TRAIN_IMAGE_LIMITS = ImageLimits(formats=tuple(sorted(ALLOWED_FORMATS)), max_costly_pixels=40_000_000)
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}
DECODE_CHUNK = 256  # images decoded (threads) and written per step: the decoder's memory is this many squares
WORK_DIR_ENV = "CL_SERVE_WORK_DIR"  # where the decoded cache lives (default: the system's temporary directory)


class _ImageFile:
    """N uint8 images of one shape in an unlinked temporary file, written and read with pwrite/pread (no mapping:
    what is read is a fresh copy, and the file's pages stay in the page cache, not in this process)."""

    def __init__(self, n: int, shape: tuple[int, ...], directory: str | None = None):
        self.shape, self.n = tuple(shape), n
        self.item = int(np.prod(shape))
        self._file = tempfile.TemporaryFile(dir=directory or os.environ.get(WORK_DIR_ENV) or None,
                                            prefix="cl-serve-decoded-")
        self.fd = self._file.fileno()

    def write(self, i: int, images: np.ndarray) -> None:
        os.pwrite(self.fd, np.ascontiguousarray(images, dtype=np.uint8).tobytes(), i * self.item)

    def read(self, index: np.ndarray) -> np.ndarray:
        """Images `index` (any order, repeats allowed) as a new (len(index), *shape) array; one pread per run of
        consecutive indices."""
        out = np.empty((len(index), *self.shape), np.uint8)
        flat = out.reshape(len(index), self.item)
        k = 0
        while k < len(index):
            j = k + 1
            while j < len(index) and index[j] == index[j - 1] + 1:
                j += 1
            want = (j - k) * self.item
            buf = os.pread(self.fd, want, int(index[k]) * self.item)
            if len(buf) != want:
                raise OSError(f"decoded image cache is short: read {len(buf)} of {want} bytes")
            flat[k:j] = np.frombuffer(buf, np.uint8).reshape(j - k, self.item)
            k = j
        return out

    def close(self) -> None:
        self._file.close()


class DecodedImages:
    """uint8 images (N, 3, side, side): a tensor in memory or an `_ImageFile`, seen through an optional index (a
    subset) and an optional centre crop. `images[i]` / `images[i:j]` / `images[index]` read a batch as a tensor;
    `subset` and `center_crop` are views that read nothing. Pickling (Ray's object store) carries the pixels."""

    def __init__(self, source: torch.Tensor | _ImageFile, index: np.ndarray | None = None,
                 crop: tuple[int, int] | None = None):
        self.source = source
        self.index = index
        self.crop = crop  # (offset, side)

    @classmethod
    def wrap(cls, images: "DecodedImages | torch.Tensor") -> "DecodedImages":
        return images if isinstance(images, DecodedImages) else cls(images)

    @property
    def _full_len(self) -> int:
        return self.source.n if isinstance(self.source, _ImageFile) else int(self.source.shape[0])

    def __len__(self) -> int:
        return self._full_len if self.index is None else len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        base = self.source.shape if isinstance(self.source, _ImageFile) else tuple(self.source.shape[1:])
        side = base[-1] if self.crop is None else self.crop[1]
        return (len(self), base[0], side, side)

    @property
    def on_disk(self) -> bool:
        return isinstance(self.source, _ImageFile)

    def _positions(self, key) -> np.ndarray:
        if isinstance(key, slice):
            pos = np.arange(len(self))[key]
        elif isinstance(key, int):
            pos = np.array([key])
        else:
            pos = np.asarray(key.cpu() if isinstance(key, torch.Tensor) else key)
            if pos.dtype == bool:
                pos = np.nonzero(pos)[0]
        pos = pos.astype(np.int64)
        if len(pos) and (pos.min() < -len(self) or pos.max() >= len(self)):
            raise IndexError(f"image index out of range for {len(self)} images")
        pos = np.where(pos < 0, pos + len(self), pos)
        return pos if self.index is None else self.index[pos]

    def __getitem__(self, key) -> torch.Tensor:
        pos = self._positions(key)
        if isinstance(self.source, _ImageFile):
            out = torch.from_numpy(self.source.read(pos))
        else:
            out = self.source[torch.from_numpy(pos)]
        if self.crop is not None:
            o, s = self.crop
            out = out[:, :, o:o + s, o:o + s].contiguous()
        return out[0] if isinstance(key, int) else out

    def subset(self, key) -> "DecodedImages":
        return DecodedImages(self.source, self._positions(key), self.crop)

    def center_crop(self, offset: int, side: int) -> "DecodedImages":
        if self.crop is not None:
            raise ValueError("the view is cropped already")
        if offset == 0 and side == self.shape[-1]:
            return self
        return DecodedImages(self.source, self.index, (offset, side))

    def materialize(self) -> torch.Tensor:
        return self[:]

    @staticmethod
    def concat(parts: list["DecodedImages | torch.Tensor"]) -> "DecodedImages":
        """One in-memory set of every part's images (benchmarks' joint runs)."""
        return DecodedImages(torch.cat([DecodedImages.wrap(p).materialize() for p in parts]))

    def __reduce__(self):
        return (DecodedImages, (self.materialize(),))


def _as_images(x) -> DecodedImages:
    return DecodedImages.wrap(x)


@dataclass
class TaskData:
    """One directory's images, decoded: class names in label order and local labels 0..n_classes-1.
    `train_u8`: the training squares (N, 3, scale, scale); `eval_u8`: the evaluation views (N, 3, input, input),
    by default a centre-crop view of the same squares (no second copy)."""

    class_names: list[str]
    train_u8: Any  # DecodedImages (a tensor is wrapped)
    eval_u8: Any  # DecodedImages (a tensor is wrapped)
    labels: torch.Tensor  # (N,) int64, index into class_names
    corrupt: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.train_u8, self.eval_u8 = _as_images(self.train_u8), _as_images(self.eval_u8)

    def __len__(self) -> int:
        return int(self.labels.numel())

    def subset(self, index) -> "TaskData":
        """The images `index` (a lazy view of the same decoded cache)."""
        index = torch.as_tensor(index)
        train = self.train_u8.subset(index) if len(self.train_u8) else self.train_u8
        return TaskData(list(self.class_names), train, self.eval_u8.subset(index), self.labels[index],
                        list(self.corrupt))


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


def _decode(path: Path, p: Preprocessing, train_view: bool) -> tuple[np.ndarray | None, str | None]:
    """One image: its training square (or, for evaluation only, its evaluation view), or why it was skipped."""
    try:
        rgb = open_bounded(path, TRAIN_IMAGE_LIMITS, min_side=p.scale_size)
    except ImageRejected as e:
        return None, f"{path}: {e.message}"
    return (to_uint8_chw(train_square(rgb, p)) if train_view else eval_crop(rgb, p)), None


def decode_stream(jobs: list[tuple[Path, int]], p: Preprocessing, train_view: bool, on_done: Callable[[int], None],
                  ) -> tuple[_ImageFile | None, list[int], list[str]]:
    """Decode `jobs` (path, label) in chunks on a thread pool, writing each chunk's images to one `_ImageFile` in
    order: (file, labels of the images kept, corrupt files)."""
    side = p.scale_size if train_view else p.input_size
    store: _ImageFile | None = _ImageFile(len(jobs), (3, side, side)) if jobs else None
    labels: list[int] = []
    corrupt: list[str] = []
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        for start in range(0, len(jobs), DECODE_CHUNK):
            chunk = jobs[start:start + DECODE_CHUNK]
            results = list(pool.map(lambda j: _decode(j[0], p, train_view), chunk))
            kept = [img for img, _ in results if img is not None]
            if kept:
                store.write(len(labels), np.stack(kept))
            labels += [y for (img, _), (_, y) in zip(results, chunk) if img is not None]
            corrupt += [err for _, err in results if err]
            on_done(len(chunk))
    if store is not None:
        store.n = len(labels)
    return store, labels, corrupt


def load_task_data(found: dict[str, list[Path]], p: Preprocessing, *, strict: bool = False,
                   train_view: bool = True, class_names: list[str] | None = None, progress: bool = False,
                   desc: str = "decoding") -> TaskData:
    """Decode every image into the disk-backed cache; corrupt files are skipped and reported, or an error with
    `strict`. `class_names` fixes the label order (evaluation against a model's labels); by default the sorted
    folders. `train_view=False` keeps the evaluation views only (evaluation and the release gate)."""
    names = class_names if class_names is not None else sorted(found)
    index = {n: i for i, n in enumerate(names)}
    jobs = [(f, index[c]) for c in sorted(found) for f in found[c]]
    with progress_reporter(len(jobs), desc, "img", enabled=progress) as bar:
        store, labels, corrupt = decode_stream(jobs, p, train_view, bar.update)
    if corrupt and strict:
        raise DataError(f"{len(corrupt)} corrupt image(s) (--strict): " + "; ".join(corrupt[:5]))
    per_class = {index[c]: 0 for c in found}
    for y in labels:
        per_class[y] += 1
    unreadable = [names[y] for y, n in per_class.items() if n == 0]
    if unreadable:
        raise DataError(f"class folder(s) without a readable image: {', '.join(unreadable)}")
    images = DecodedImages(store)
    if train_view:
        train, evaluation = images, images.center_crop(eval_offset(p), p.input_size)
    else:
        train, evaluation = DecodedImages(torch.empty(0, 3, p.scale_size, p.scale_size, dtype=torch.uint8)), images
    return TaskData(class_names=names, train_u8=train, eval_u8=evaluation,
                    labels=torch.tensor(labels, dtype=torch.int64), corrupt=corrupt)
