"""The replica's dynamic batcher: what arrives while a batch runs is the next batch (not many batches of one, as
Ray 2.60's @serve.batch forms them), images are counted, models never share a batch, cancelled callers are not
run, a model's error reaches its callers only."""
import asyncio
import threading

import numpy as np
import pytest

from cl_serve.serving.batcher import ModelBatcher


class GatedModel:
    """model.run(x) -> x * factor, blocking until `gate` is set; records each batch's size."""

    def __init__(self, factor: float = 1.0, fail: bool = False):
        self.factor, self.fail = factor, fail
        self.batches: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Event()

    def run(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        self.started.set()
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("model broke")
        return x * self.factor


def images(n: int, value: float = 1.0) -> np.ndarray:
    return np.full((n, 2), value, np.float32)


async def wait_started(model: GatedModel) -> None:
    while not model.started.is_set():
        await asyncio.sleep(0.001)


async def behind_a_running_batch(batcher: ModelBatcher, first: GatedModel, queued: list) -> list:
    """Run one image of `first` (held at its gate), queue `queued` [(model, images)] while it runs, release it:
    every caller's output, the first one's first."""
    first.gate.clear()
    running = asyncio.create_task(batcher.run(first, images(1, 0)))
    await wait_started(first)
    rest = [asyncio.create_task(batcher.run(m, x)) for m, x in queued]
    await asyncio.sleep(0.05)  # every one of them queued while the model is busy
    first.gate.set()
    return await asyncio.gather(running, *rest)


def test_what_arrives_while_a_batch_runs_is_one_next_batch():
    async def main():
        model = GatedModel()
        out = await behind_a_running_batch(ModelBatcher(max_batch_images=32), model,
                                           [(model, images(1, i)) for i in range(1, 21)])
        assert model.batches == [1, 20]
        assert [float(o[0, 0]) for o in out] == list(range(21))  # each caller gets its own rows
    asyncio.run(main())


def test_an_idle_model_runs_a_lone_request_at_once_or_waits_when_asked():
    async def main():
        model = GatedModel()
        batcher = ModelBatcher(max_batch_images=32)
        await batcher.run(model, images(1))
        waiting = ModelBatcher(max_batch_images=32, wait_s=0.2)
        model.batches.clear()
        tasks = [asyncio.create_task(waiting.run(model, images(1)))]
        await asyncio.sleep(0.02)
        tasks += [asyncio.create_task(waiting.run(model, images(1))) for _ in range(3)]
        await asyncio.gather(*tasks)
        assert model.batches == [4]
    asyncio.run(main())


def test_batches_count_images_and_an_oversized_request_runs_alone():
    async def main():
        model = GatedModel()
        out = await behind_a_running_batch(ModelBatcher(max_batch_images=8), model,
                                           [(model, images(n)) for n in (3, 3, 3, 20, 2)])
        assert [len(o) for o in out] == [1, 3, 3, 3, 20, 2]
        assert model.batches == [1, 8, 3, 20]  # 3+3 and the 2 that fits; the 20-image request runs alone
    asyncio.run(main())


def test_models_never_share_a_batch_and_keep_their_order():
    async def main():
        old, new = GatedModel(1.0), GatedModel(10.0)
        out = await behind_a_running_batch(ModelBatcher(max_batch_images=32), old,
                                           [(m, images(1, 1)) for m in (old, new, old, new)])
        assert [float(o[0, 0]) for o in out] == [0, 1, 10, 1, 10]
        assert old.batches == [1, 2] and new.batches == [2]
    asyncio.run(main())


def test_a_cancelled_caller_is_not_run_and_a_model_error_reaches_only_its_batch():
    async def main():
        model = GatedModel()
        model.gate.clear()
        batcher = ModelBatcher(max_batch_images=32)
        first = asyncio.create_task(batcher.run(model, images(1)))
        await wait_started(model)
        gone = asyncio.create_task(batcher.run(model, images(5)))
        kept = asyncio.create_task(batcher.run(model, images(1)))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        model.gate.set()
        await asyncio.gather(first, kept)
        assert model.batches == [1, 1]

        broken = GatedModel(fail=True)
        with pytest.raises(RuntimeError, match="model broke"):
            await batcher.run(broken, images(2))
        assert batcher.alive
        assert len(await batcher.run(model, images(3))) == 3  # the worker goes on after a model's error
    asyncio.run(main())


def test_a_failing_metrics_callback_does_not_stop_the_worker():
    def broken_metric(n: int) -> None:
        raise RuntimeError("metrics backend down")

    async def main():
        batcher = ModelBatcher(max_batch_images=32, on_batch=broken_metric)
        model = GatedModel(factor=2.0)
        for n in (1, 4):
            out = await asyncio.wait_for(batcher.run(model, images(n)), timeout=10)  # a stopped worker: never
            assert np.array_equal(out, images(n, 2.0))
        assert batcher.alive and model.batches == [1, 4]
    asyncio.run(main())


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        ModelBatcher(max_batch_images=0)
    with pytest.raises(ValueError):
        ModelBatcher(wait_s=-1)
