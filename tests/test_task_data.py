"""Task data at scale: decoding streams into a disk-backed cache (memory does not follow the image count), the
evaluation view is cut exactly from the training square, camera photos are turned upright by their EXIF orientation
everywhere, and progress off a terminal is a few plain lines."""
import io
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cl_serve.contract.image_decode import ImageLimits, open_bounded
from cl_serve.contract.preprocessing import Preprocessing, eval_crop, eval_offset, preprocess_image, to_uint8_chw, \
    train_square


def test_the_evaluation_view_is_the_centre_of_the_training_square():
    rng = np.random.default_rng(0)
    for _ in range(200):
        w, h = (int(v) for v in rng.integers(12, 300, 2))
        p = Preprocessing.from_crop_pct(int(rng.integers(8, 48)), float(rng.uniform(0.5, 1.0)), (0.5,) * 3, (0.5,) * 3,
                                        "bilinear")
        img = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        square, o = to_uint8_chw(train_square(img, p)), eval_offset(p)
        assert square.shape == (3, p.scale_size, p.scale_size)
        assert np.array_equal(square[:, o:o + p.input_size, o:o + p.input_size], eval_crop(img, p)), (w, h, p)


def test_decoded_images_live_in_an_unlinked_file_and_read_back_exactly(tmp_path):
    from cl_serve.trainer.data import DecodedImages, load_task_data, scan_image_folder
    from cl_serve.trainer.synthetic import class_names, write_image_folder

    folder = write_image_folder(tmp_path / "task", class_names(3), 7, seed=0)
    p = Preprocessing.from_crop_pct(16, 0.8, (0.5,) * 3, (0.5,) * 3)
    found = scan_image_folder(folder)
    data = load_task_data(found, p)
    assert isinstance(data.train_u8, DecodedImages) and data.train_u8.on_disk
    assert data.train_u8.shape == (21, 3, 20, 20) and data.eval_u8.shape == (21, 3, 16, 16)
    files = [f for c in sorted(found) for f in found[c]]
    want = torch.stack([torch.from_numpy(eval_crop(Image.open(f), p)) for f in files])
    assert torch.equal(data.eval_u8[:], want)  # the server's pixels, cut from the cached squares
    idx = torch.tensor([20, 3, 4, 5, 3, 0])  # any order, repeats, consecutive runs
    assert torch.equal(data.eval_u8[idx], want[idx])
    sub = data.subset(torch.tensor([1, 2, 19]))
    assert len(sub) == 3 and torch.equal(sub.eval_u8[:], want[[1, 2, 19]]) and torch.equal(sub.labels, data.labels[[1, 2, 19]])
    assert list(tmp_path.glob("**/cl-serve-decoded-*")) == []  # nothing named on disk, nothing left behind
    import pickle

    again = pickle.loads(pickle.dumps(data.eval_u8))  # Ray's object store carries the pixels
    assert torch.equal(again[:], want)


def test_decoding_memory_does_not_follow_the_number_of_images(tmp_path):
    """Peak RSS of a fresh process decoding 64 vs 640 images of 96 px into 64-px squares (1,000 squares would be
    12 MB): the larger task adds far less than its squares' size."""
    from cl_serve.trainer.synthetic import class_names, write_image_folder

    folder = write_image_folder(tmp_path / "task", class_names(4), 160, seed=0, size=96)
    script = ("import sys, resource; from cl_serve.trainer.data import load_task_data, scan_image_folder; "
              "from cl_serve.contract.preprocessing import Preprocessing; "
              "found = {c: f[:int(sys.argv[2])] for c, f in scan_image_folder(sys.argv[1]).items()}; "
              "d = load_task_data(found, Preprocessing.from_crop_pct(64, 1.0, (0.5,)*3, (0.5,)*3)); "
              "print(len(d), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    peaks = {}
    for per_class in (16, 160):
        out = subprocess.run([sys.executable, "-c", script, str(folder), str(per_class)], capture_output=True,
                             text=True, check=True).stdout.split()
        assert int(out[0]) == 4 * per_class
        peaks[per_class] = int(out[1]) / 1024
    squares_mib = 4 * 160 * 3 * 64 * 64 / 2**20  # 7.5 MiB held in memory before this change
    assert peaks[160] - peaks[16] < squares_mib / 2, peaks


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_in_training_and_serving_alike(orientation):
    """A phone photo stored sideways with its orientation tag decodes upright, in the trainer's decoder and in the
    server's preprocessing (both go through open_bounded)."""
    upright = Image.new("RGB", (60, 40), (0, 0, 0))
    upright.paste((255, 0, 0), (0, 0, 30, 40))  # left half red: tells left from right after turning
    stored = {1: upright, 3: upright.rotate(180), 6: upright.rotate(90, expand=True),
              8: upright.rotate(270, expand=True)}[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    decoded = open_bounded(buf.getvalue(), ImageLimits())
    assert decoded.size == (60, 40)
    px = np.asarray(decoded, dtype=int)
    assert px[20, 5, 0] > 200 and px[20, 55, 0] < 60  # red on the left, as the photographer saw it
    p = Preprocessing.from_crop_pct(32, 1.0, (0.5,) * 3, (0.5,) * 3)
    assert np.abs(preprocess_image(decoded, p) - preprocess_image(upright, p)).mean() < 0.05  # JPEG noise only


def test_progress_off_a_terminal_is_a_few_plain_lines():
    from cl_serve.base.progress import LogLines

    clock = iter(range(0, 10_000, 1)).__next__  # one second per update
    out = io.StringIO()
    bar = LogLines(1000, "decoding", "img", out, every_percent=10, every_seconds=30, clock=clock)
    for _ in range(1000):
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert lines[0].endswith("started (1000 img)") and lines[-1].startswith("[cl-serve] decoding: done: 1000/1000")
    assert 10 <= len(lines) <= 40, lines  # every 30 s of a 1000-s stage, never a line per step
    assert all("img/s" in line and "left" in line for line in lines[1:-1])
