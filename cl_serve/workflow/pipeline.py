"""The publishing pipeline behind the CLI: init a store, add a task, evaluate, re-export, roll back, status.

Data flows trainer -> export -> store: a task is validated before anything is trained, learned with the store's
method, merged into a plain timm model, exported to ONNX and parity-checked, then published as a new immutable
version under the writer lock. Nothing here is imported by the server.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from safetensors.torch import load_file, save_file

from cl_serve.workflow import release_gate
from cl_serve.base.errors import StoreError, UserError
from cl_serve.base.heap import HeapTrimmer
from cl_serve.store.remote_inputs import local_copy
from cl_serve.contract.store_schema import (LEGACY_MERGED, GateDecision, Metrics, OnnxInfo, TaskRecord,
                                            describe_error)
from cl_serve.store.model_store import (LOCK_HINTS, Manifest, Store, StoreConfig, VerifiedVersion, atomic_write_text,
                            sha256_file)
from cl_serve.store.onnx_switch import staging_dir, switch_onnx
from cl_serve.store.open_store import open_store
from cl_serve.contract.preprocessing import Preprocessing
from cl_serve.trainer import backbone as bb
from cl_serve.trainer.data import TaskData, check_known_classes, check_new_classes, load_task_data, scan_image_folder
from cl_serve.trainer.learner import Learner
from cl_serve.trainer.token_path import check_token_path
from cl_serve.trainer.merge import build_plain_model, merged_state_dict
from cl_serve.trainer.ray_train import LearnerFactory, train_task_on_ray
from cl_serve.trainer.heads import head_config_from_dict
from cl_serve.trainer.auto import choose_method
from cl_serve.trainer.methods import method_config_from_dict
from cl_serve.contract.head_settings import HeadConfig
from cl_serve.contract.method_settings import AutoConfig, MethodConfig, NoneConfig
from cl_serve.trainer.train import TrainConfig, predict, resolve_device, train_task
from cl_serve.workflow.versions import promote, rollback, set_policy, status  # noqa: F401  (the pipeline's other commands)


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux reports ru_maxrss in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def parse_method(method: dict[str, Any] | MethodConfig):
    try:
        return method_config_from_dict(method)
    except ValidationError as e:
        raise UserError(f"invalid method settings: {describe_error(e, limit=None)}") from None


def parse_head(head: dict[str, Any] | HeadConfig | None):
    try:
        return head_config_from_dict(head)
    except ValidationError as e:
        raise UserError(f"invalid head settings: {describe_error(e, limit=None)}") from None


def init_store(root: str | Path, *, method: dict[str, Any], head: dict[str, Any] | None = None,
               backbone: str | None = None, checkpoint: str | Path | None = None, pretrained: bool = False,
               timm_kwargs: dict[str, Any] | None = None, seed: int = 0) -> StoreConfig:
    """Create a store: backbone weights + card under backbone/, store.json with method, head and preprocessing."""
    store = open_store(root)
    if store.exists():
        raise StoreError(f"{store.name} already holds a store (store.json exists); use another --store")
    mcfg = parse_method(method)
    hcfg = parse_head(head)
    if (backbone is None) == (checkpoint is None):
        raise UserError("give exactly one of --backbone TIMM_NAME or --checkpoint FILE")
    if checkpoint is not None:
        spec, weights, prep, card = bb.from_checkpoint(local_copy(checkpoint, single_file=True))
    else:
        spec, weights, prep, card = bb.from_timm(backbone, pretrained, timm_kwargs, seed)
    probe = Learner(spec, weights, mcfg.candidate if isinstance(mcfg, AutoConfig) else mcfg, hcfg)  # fails early
    # if the targets do not fit this architecture, and if the frozen-prefix cache cannot resume this family's forward
    check_token_path(probe.backbone, prep.input_size)
    del probe
    with store.lock():
        store.backbone_dir.mkdir(parents=True, exist_ok=True)
        meta = {"timm_model": spec.timm_model, "timm_kwargs": json.dumps(spec.timm_kwargs)}
        tmp = store.backbone_dir / ".model.safetensors.tmp"
        save_file(weights, str(tmp), metadata=meta)
        tmp.replace(store.backbone_weights_path())
        card = {**{k: v for k, v in card.items() if k != "classes"}, "timm_model": spec.timm_model,
                "timm_kwargs": spec.timm_kwargs, "source": spec.source, "preprocessing": prep.model_dump()}
        atomic_write_text(store.backbone_dir / "card.json", json.dumps(card, indent=2, default=str))
        config = StoreConfig(backbone=spec, backbone_sha256=sha256_file(store.backbone_weights_path()),
                             method=mcfg, head=hcfg, preprocessing=prep)
        store.create(config)
    return config


def _backbone(store: Store, cfg: StoreConfig | None = None) -> tuple[bb.BackboneSpec, dict[str, torch.Tensor]]:
    """The store's backbone spec and weights, verified against store.json (`cfg`: as the caller read it)."""
    cfg = cfg or store.config()
    store.verify_backbone(cfg)
    return cfg.backbone, load_file(str(store.backbone_weights_path()))


def learner_factory(store: Store, version: int | None, cfg: StoreConfig | None = None) -> LearnerFactory:
    """How to build the learner of `version` (None: a fresh one), here or on Ray Train workers; `cfg`: store.json
    when the caller has read it already."""
    cfg = cfg or store.config()
    spec, weights = _backbone(store, cfg)
    if version is None:
        mcfg = parse_method(cfg.method)
        if isinstance(mcfg, AutoConfig):  # add-task decides on the first task; a learner before it holds nothing
            mcfg = NoneConfig()
        return LearnerFactory(spec, weights, None, mcfg, parse_head(cfg.head))
    path = store.verified(version).path / "learner.safetensors"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    return LearnerFactory(spec, weights, (load_file(str(path)), metadata), None, None)


def open_learner(store: Store, version: int | None) -> Learner:
    """The learner state of `version` (None: a fresh learner with no task)."""
    return learner_factory(store, version)()


def merged_weights(store: Store, version: int) -> dict[str, torch.Tensor]:
    """A version's plain weights (what its ONNX file computes), merged from its learner on demand; a version
    written before merged weights stopped being stored in every version is read from its own file."""
    handle = store.verified(version)
    if LEGACY_MERGED in handle.manifest.files:
        return load_file(str(handle.path / LEGACY_MERGED))
    return merged_state_dict(open_learner(store, version))


def load_merged_model(store: Store, version: int) -> torch.nn.Module:
    """The plain timm model of a version (what the ONNX file computes)."""
    return build_plain_model(store.config().backbone, merged_weights(store, version))


def accuracy_report(model, data: TaskData, labels: list[str], tasks: list[TaskRecord], p: Preprocessing,
                    batch_size: int = 256, device="cpu") -> dict[str, Any]:
    """Overall accuracy and accuracy per task (test classes grouped by the task that introduced them)."""
    pred = predict(model, data.eval_u8, p, batch_size, device)
    truth = data.labels
    task_of = {labels.index(lbl): t.index for t in tasks for lbl in t.labels}
    per_task = []
    for t in tasks:
        mask = torch.tensor([task_of[int(y)] == t.index for y in truth])
        if mask.any():
            per_task.append({"task": t.index, "accuracy": float((pred[mask] == truth[mask]).float().mean()),
                             "images": int(mask.sum())})
    return {"accuracy": float((pred == truth).float().mean()), "images": int(truth.numel()), "per_task": per_task}


def add_task(root: str | Path, data_dir: str | Path, train: TrainConfig, *, test_data: str | Path | None = None,
             strict: bool = False, wait: bool = False, export: bool = True, progress: bool = True,
             log: Callable[[str], None] = lambda s: None, workers: int = 1,
             gpus_per_worker: float = 0.0) -> "AddTaskResult":
    """Learn the classes in `data_dir` on top of the live version and publish the result as a new version
    (`workers` > 1: on that many Ray Train workers, see cl_serve.trainer.ray_train). The stages, in order: check
    the inputs against the live version, decode, choose the method (only `auto`, on the first task), train,
    merge, evaluate and gate, publish."""
    store = open_store(root)
    cfg = store.config()
    t0 = time.time()
    heap = HeapTrimmer()  # what each step frees goes back to the system: the peak does not grow with the task
    with store.lock(wait=wait), heap:
        parent = store.current()
        parent_manifest = store.verified(parent).manifest if parent is not None else None
        found, test_found = _check_inputs(data_dir, test_data, parent_manifest, progress)
        device = resolve_device(train.device)  # an unavailable device is an error before any decoding
        log(f"decoding {sum(len(v) for v in found.values())} images of {len(found)} new classes from {data_dir}")
        t_decode = time.time()
        data = load_task_data(found, cfg.preprocessing, strict=strict, progress=progress, desc="decoding task images")
        decode_seconds = time.time() - t_decode
        heap.trim()  # between stages too: each stage's transients land on a heap without the last one's holes
        summary_extra = {"decode_seconds": decode_seconds}
        for line in data.corrupt:
            log(f"skipped corrupt image {line}")
        factory, choice = _choose(store, cfg, parent, data, train, progress, log)
        learner, summary, task_index = _train(factory, data, cfg.preprocessing, train, device, workers,
                                              gpus_per_worker, progress, log)
        heap.trim()
        merged = merged_state_dict(learner)
        model = build_plain_model(cfg.backbone, merged)
        tasks = (parent_manifest.tasks if parent_manifest else []) + [
            TaskRecord(index=task_index, labels=data.class_names, version=0)]
        metrics, gate = _evaluate_and_gate(store, cfg.preprocessing, model, learner, parent_manifest, tasks,
                                           test_found, summary, train, log)
        heap.trim()  # before the export, the largest transient after training
        summary_extra["heap"] = heap.describe()
        published, onnx_info = _publish(store, cfg, learner, model, parent, task_index, tasks, metrics, gate,
                                        choice, {**summary, **summary_extra}, train, device, len(data.corrupt),
                                        workers, export)
    return AddTaskResult(
        version=published.number, parent=parent, task=task_index, classes_added=data.class_names,
        total_classes=len(learner.labels), seconds=time.time() - t0, train_seconds=summary["seconds"],
        decode_seconds=decode_seconds, metrics=metrics, method_summary=summary["method"],
        head_summary=summary["head"], onnx=onnx_info, device=str(device), gate=gate,
        live=gate is None or gate.passed, method=learner.method_config.name, auto=choice)


class AddTaskResult(BaseModel):
    """What `add_task` did: the version it published, what it learned, how it scored, whether it is live."""

    model_config = ConfigDict(frozen=True)
    version: int
    parent: Optional[int]
    task: int
    classes_added: list[str]
    total_classes: int
    seconds: float
    train_seconds: float
    decode_seconds: float
    metrics: Metrics  # train_accuracy, final_loss, and test (accuracy, per_task) with --test-data
    method_summary: dict[str, Any]
    head_summary: dict[str, Any]
    onnx: Optional[OnnxInfo]  # None with export=False
    device: str
    gate: Optional[GateDecision]  # None without a release policy
    live: bool  # False: a candidate the gate refused
    method: str
    auto: Optional[dict[str, Any]]  # --method auto's evidence on the first task, else None


def _check_inputs(data_dir, test_data, parent_manifest: Manifest | None, progress: bool):
    """The task's classes (all new) and the test folder's (all known after this task), before any decoding."""
    known = parent_manifest.labels if parent_manifest else []
    found = scan_image_folder(local_copy(data_dir, progress=progress))
    check_new_classes(found, known)
    test_found = None
    if test_data is not None:
        test_found = scan_image_folder(local_copy(test_data, progress=progress))
        check_known_classes(test_found, known + sorted(found))
    return found, test_found


def _choose(store: Store, cfg: StoreConfig, parent: int | None, data: TaskData, train: TrainConfig,
            progress: bool, log: Callable[[str], None]) -> tuple[LearnerFactory, dict[str, Any] | None]:
    """The learner to train: the parent's; a fresh one; or, for `auto` on the first task, the measured winner."""
    mcfg = parse_method(cfg.method)
    if parent is not None or not isinstance(mcfg, AutoConfig):
        return learner_factory(store, parent, cfg), None
    spec, weights = _backbone(store, cfg)
    log(f"method auto: trying the frozen backbone and {mcfg.candidate.name} on {1 - mcfg.holdout:.0%} of each "
        f"class, scoring on the rest")
    try:
        winner, head, choice = choose_method(spec, weights, mcfg, parse_head(cfg.head), data, cfg.preprocessing,
                                             train, progress=progress, log=log)
    except ValueError as e:
        raise UserError(f"method auto: {e}") from None
    c = choice["chosen"]
    log(f"method auto: chose {c['method']}" + (f", M = {c['projection']}" if c["projection"] is not None else "")
        + f" (held-out accuracy: adapter {c['adapter_held_out_accuracy']:.3f}, frozen "
          f"{c['frozen_held_out_accuracy']:.3f}, margin {choice['margin']:g}); training it on every image")
    return LearnerFactory(spec, weights, None, winner, head), choice


def _train(factory: LearnerFactory, data: TaskData, prep: Preprocessing, train: TrainConfig, device, workers: int,
           gpus_per_worker: float, progress: bool, log: Callable[[str], None]):
    """(learner on the CPU, training summary, task index), here or on Ray Train workers."""
    if workers > 1:
        log(f"training on {workers} Ray Train workers ({gpus_per_worker:g} GPU each)")
        learner, summary = train_task_on_ray(factory, data, prep, train, workers=workers,
                                             gpus_per_worker=gpus_per_worker)
        summary["workers"] = workers
        return learner, summary, learner.num_tasks - 1
    learner = factory().to_device(device)
    task_index = learner.num_tasks
    summary = train_task(learner, data, prep, train, progress=progress, desc=f"task {task_index}")
    learner.to_device("cpu")
    return learner, summary, task_index


def _evaluate_and_gate(store: Store, prep: Preprocessing, model, learner: Learner, parent_manifest: Manifest | None,
                       tasks: list[TaskRecord], test_found, summary: dict[str, Any], train: TrainConfig,
                       log: Callable[[str], None]) -> tuple[Metrics, GateDecision | None]:
    """Training metrics, test accuracy when a test folder was given, and the release gate's decision."""
    labels = list(learner.labels)
    metrics: dict[str, Any] = {"train_accuracy": summary["train_accuracy"], "final_loss": summary["final_loss"]}
    if test_found is not None:
        test = load_task_data(test_found, prep, train_view=False, class_names=labels)
        metrics["test"] = accuracy_report(model, test, labels, tasks, prep, train.eval_batch_size)
    policy = store.policy()
    gate = run_gate(store, policy, model, parent_manifest, labels, tasks, train.eval_batch_size, log) \
        if policy.gate_data else None
    return Metrics(**metrics), gate


def _publish(store: Store, cfg: StoreConfig, learner: Learner, model,
             parent: int | None, task_index: int, tasks: list[TaskRecord], metrics: Metrics,
             gate: GateDecision | None, choice: dict[str, Any] | None, summary: dict[str, Any], train: TrainConfig,
             device, corrupt: int, workers: int, export: bool) -> tuple[VerifiedVersion, dict[str, Any] | None]:
    """Write the learner and (with `export`) the parity-checked ONNX file into a new version (the merged weights
    are not stored: `cl-serve export --safetensors` writes them on demand),
    then publish it: live if the gate passed or there is none, else a candidate. Nothing is left on a failure."""
    labels = list(learner.labels)
    writer = store.new_version()
    tasks[-1] = tasks[-1].model_copy(update={"version": writer.version})
    try:
        tensors, meta = learner.state()
        save_file(tensors, str(writer.file("learner.safetensors")), metadata=meta)
        onnx_info, t_export = None, time.time()
        if export:
            onnx_info = OnnxInfo(**_export(model, writer.file("model.onnx"), cfg.preprocessing, labels,
                                           writer.version, learner.method_config.name), file="model.onnx")
        export_seconds = time.time() - t_export if export else None
        manifest = Manifest(
            version=writer.version, parent=parent, task_index=task_index, labels=labels, tasks=tasks,
            preprocessing=cfg.preprocessing, backbone=cfg.backbone, metrics=metrics, onnx=onnx_info, gate=gate,
            method=learner.method_config.model_copy(update={"chosen_by": choice}),
            head=learner.head_config, files={},
            training={**train.model_dump(), "device": str(device),
                      "seconds": summary["seconds"], "workers": workers, "train_images": summary["train_images"],
                      "corrupt_skipped": corrupt, "method_summary": summary["method"],
                      "head_summary": summary["head"], "head_state_bytes": learner.head.state_bytes(),
                      "decode_seconds": summary.get("decode_seconds"), "export_seconds": export_seconds,
                      "head_seconds": summary.get("head_seconds"),
                      "train_steps_seconds": summary.get("train_steps_seconds"),
                      "peak_rss_mib": peak_rss_mib(), "heap": summary.get("heap"), "cache": summary.get("cache")})
        return store.publish(writer, manifest, make_current=gate is None or gate.passed), onnx_info
    except BaseException:
        writer.discard()
        raise


def run_gate(store: Store, policy, model, parent_manifest: Manifest | None, labels: list[str],
             tasks: list[TaskRecord], batch_size: int, log: Callable[[str], None]) -> GateDecision:
    """Per-task accuracy of the new model and of its parent on the policy's gate data, and the decision."""
    gate_folder = local_copy(policy.gate_data, progress=False)
    found = {c: files for c, files in scan_image_folder(gate_folder).items() if c in labels}
    if not found:
        raise UserError(f"the gate data {policy.gate_data} holds none of the model's classes: fix the policy "
                        "(`cl-serve policy --gate-data DIR`) or turn the gate off (`cl-serve policy --off`)")
    prep = store.config().preprocessing
    data = load_task_data(found, prep, train_view=False, class_names=labels)
    log(f"release gate: {len(data)} images of {len(found)} classes from {policy.gate_data}")
    new = accuracy_report(model, data, labels, tasks, prep, batch_size)
    parent_acc: dict[int, float] = {}
    if parent_manifest is not None:
        old = len(parent_manifest.labels)
        keep = data.labels < old
        if keep.any():
            sub = TaskData(class_names=labels[:old], train_u8=data.train_u8, eval_u8=data.eval_u8.subset(keep),
                           labels=data.labels[keep])
            parent_model = load_merged_model(store, parent_manifest.version)
            report = accuracy_report(parent_model, sub, parent_manifest.labels, parent_manifest.tasks, prep, batch_size)
            parent_acc = {p["task"]: p["accuracy"] for p in report["per_task"]}
    decision = release_gate.decide(parent_acc, {p["task"]: p["accuracy"] for p in new["per_task"]}, tasks[-1].index,
                                   max_drop=policy.max_drop, min_new_accuracy=policy.min_new_accuracy,
                                   gate_images={p["task"]: p["images"] for p in new["per_task"]})
    return GateDecision(**decision, gate_data=policy.gate_data, accuracy=new["accuracy"],
                        parent=parent_manifest.version if parent_manifest else None)


def _export(model, path: Path, prep: Preprocessing, labels: list[str], version: int, method: str,
            fp16: bool = False, opset: int | None = None) -> dict[str, Any]:
    from cl_serve.export.onnx_export import OPSET, export_onnx
    from cl_serve.export.parity import check_parity

    info = export_onnx(model, path, preprocessing=prep, labels=labels, fp16=fp16, opset=opset or OPSET,
                       metadata={"version": str(version), "method": method})
    info.update(check_parity(model, path, prep.input_size, fp16=fp16).manifest_fields())
    return info


def export_version(root: str | Path, version: int | None = None, *, fp16: bool = False,
                   opset: int | None = None) -> dict[str, Any]:
    """Re-export a version's ONNX from its merged weights (parity-checked). The version's files are never
    rewritten in place: the new file gets a new name and the manifest switches to it atomically
    (`cl_serve.store.onnx_switch`); identical bytes change nothing. fp16 attaches a half-precision file for GPUs
    next to the fp32 one; `opset` picks another ONNX opset (e.g. for an older runtime)."""
    store = open_store(root)
    with store.lock(hint=LOCK_HINTS["export"]):
        handle = store.verified_or_live(version)
        v, m = handle.number, handle.manifest
        model = load_merged_model(store, v)  # the same Store: its files are not hashed again
        with staging_dir(store, v) as tmp:
            graph = tmp / "model.onnx"
            info = _export(model, graph, m.preprocessing, m.labels, v, m.method.name, fp16=fp16, opset=opset)
            name = switch_onnx(store, handle, graph, info, precision="fp16" if fp16 else "fp32")
    return {"version": v, "file": str(store.version_dir(v) / name), **info}


def evaluate(root: str | Path, data_dir: str | Path, version: int | None = None, batch_size: int = 256) -> dict:
    """Accuracy of a version's merged model on an ImageFolder of known classes, overall and per task."""
    store = open_store(root)
    handle = store.verified_or_live(version)
    v, m = handle.number, handle.manifest
    found = scan_image_folder(local_copy(data_dir))
    check_known_classes(found, m.labels)
    data = load_task_data(found, m.preprocessing, train_view=False, class_names=m.labels)
    report = accuracy_report(load_merged_model(store, v), data, m.labels, m.tasks, m.preprocessing, batch_size)
    return {"version": v, **report}
