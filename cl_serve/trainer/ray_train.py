"""Multi-worker training of one task with Ray Train (`cl-serve add-task --workers N`).

A `TorchTrainer` starts N workers (DDP-style: gloo on CPU, NCCL on GPU); each rebuilds the learner from the
parent's state, trains on its share of every batch with gradients summed across workers, and reduces InfLoRA's
second moments and the head's features through `cl_serve.trainer.collective.TorchDistributed`, so the N workers end with
the same learner, equal to a one-process run up to float summation order on a frozen backbone (and up to the
augmentation's random crops, drawn per worker, with adapters). Worker 0 hands the learner's state (safetensors
bytes) to a zero-CPU `_Inbox` actor the driver created, through Ray's object store, so workers on other nodes (GPU
pods of a RayJob) need no storage shared with the driver; the caller merges, exports and publishes it as usual.
Inside a Ray cluster (a RayJob) it uses that cluster; elsewhere it starts a local Ray on 127.0.0.1.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from cl_serve.contract.preprocessing import Preprocessing
from cl_serve.trainer.data import TaskData
from cl_serve.trainer.learner import Learner
from cl_serve.trainer.train import TrainConfig


def _worker_loop(config: dict[str, Any]) -> None:
    import ray
    import ray.train

    from cl_serve.base.heap import HeapTrimmer
    from cl_serve.trainer.collective import TorchDistributed
    from cl_serve.trainer.train import train_task

    payload = ray.get(config["payload"])
    coll = TorchDistributed()
    learner = payload["make_learner"]()
    device = ray.train.torch.get_device() if config["use_gpu"] else torch.device("cpu")
    learner.to_device(device)
    with HeapTrimmer():  # as in add-task (cl_serve.base.heap)
        summary = train_task(learner, payload["data"], payload["prep"], payload["cfg"], progress=False,
                             collective=coll)
    learner.to_device("cpu")
    if coll.rank == 0:
        tensors, meta = learner.state()
        ray.get(config["inbox"].put.remote(save(tensors, metadata=meta), json.dumps(summary, default=str)))
    ray.train.report({"rank": coll.rank})


class _Inbox:
    """Holds what worker 0 sends back (the learner's state and its summary) until the driver takes it."""

    def __init__(self):
        self.item: tuple[bytes, str] | None = None

    def put(self, state: bytes, summary: str) -> None:
        self.item = (state, summary)

    def take(self) -> tuple[bytes, str] | None:
        return self.item


class LearnerFactory:
    """Picklable recipe for the starting learner (the parent's state, or a fresh one) on each worker."""

    def __init__(self, spec, weights, state: tuple[dict, dict] | None, method_cfg, head_cfg):
        self.spec, self.weights, self.state, self.method_cfg, self.head_cfg = spec, weights, state, method_cfg, head_cfg

    def __call__(self) -> Learner:
        if self.state is None:
            return Learner(self.spec, self.weights, self.method_cfg, self.head_cfg)
        return Learner.from_state(self.spec, self.weights, self.state[0], self.state[1])


def train_task_on_ray(factory: LearnerFactory, data: TaskData, prep: Preprocessing, cfg: TrainConfig, *,
                      workers: int, gpus_per_worker: float = 0.0, storage: str | None = None
                      ) -> tuple[Learner, dict[str, Any]]:
    """Train one task on `workers` Ray Train workers; returns worker 0's learner (on CPU) and its summary."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        import os

        if not os.environ.get("RAY_ADDRESS"):
            from cl_serve.base.loopback import use_loopback_ray

            use_loopback_ray()
            ray.init(num_cpus=workers + 1, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
        else:
            ray.init(logging_level="WARNING")
    payload = ray.put({"make_learner": factory, "data": data, "prep": prep, "cfg": cfg})
    inbox = ray.remote(num_cpus=0)(_Inbox).remote()
    resources = {"CPU": 1, **({"GPU": gpus_per_worker} if gpus_per_worker else {})}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = TorchTrainer(
            _worker_loop, train_loop_config={"payload": payload, "inbox": inbox, "use_gpu": gpus_per_worker > 0},
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus_per_worker > 0,
                                         resources_per_worker=resources),
            run_config=RunConfig(storage_path=storage or tmp, name="cl-serve-add-task"))
        result = trainer.fit()
    item = ray.get(inbox.take.remote())
    ray.kill(inbox)
    if item is None:
        raise RuntimeError(f"Ray Train returned no learner: {result.error}")
    state, summary = item
    with tempfile.TemporaryDirectory() as tmp:  # safetensors reads metadata from a file, not from bytes
        path = Path(tmp) / "learner.safetensors"
        path.write_bytes(state)
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        learner = Learner.from_state(factory.spec, factory.weights, load_file(str(path)), metadata)
    return learner, json.loads(summary)
