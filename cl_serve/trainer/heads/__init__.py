"""Classifier heads behind one interface (`base.Head`), selected by name from a typed config (`--head`)."""
from __future__ import annotations

from cl_serve.trainer.heads.base import Head
from cl_serve.contract.head_settings import HEAD_NAMES, HeadConfig, head_config_from_dict


def build_head(config, dim: int) -> Head:
    """The Head object for a validated config (the only place that maps head names to classes)."""
    from cl_serve.trainer.heads.aligned import AlignedHead
    from cl_serve.trainer.heads.analytic import AnalyticHead
    from cl_serve.trainer.heads.task_local import TaskLocalHead

    cls = {"task-local": TaskLocalHead, "aligned": AlignedHead, "analytic": AnalyticHead}[config.name]
    return cls(config, dim)


__all__ = ["Head", "HeadConfig", "HEAD_NAMES", "build_head", "head_config_from_dict"]
