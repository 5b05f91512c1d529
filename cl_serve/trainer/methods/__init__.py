"""Continual-learning methods behind one interface (`base.Method`), selected by name from a typed config."""
from __future__ import annotations

from cl_serve.trainer.methods.base import Method
from cl_serve.contract.method_settings import MethodConfig, method_config_from_dict, METHOD_NAMES


def build_method(config: MethodConfig, sites) -> Method:
    """The Method object for a validated config (the only place that maps names to classes)."""
    from cl_serve.trainer.methods.inflora import InfLoRA
    from cl_serve.trainer.methods.sdlora import SDLoRA
    from cl_serve.trainer.methods.frozen import Frozen
    from cl_serve.trainer.methods.seqlora import SeqLoRA

    if config.family == "auto":
        raise ValueError("method 'auto' is not a method: cl_serve.trainer.auto.choose_method picks one on the first task")
    cls = {"inflora": InfLoRA, "sdlora": SDLoRA, "seq-lora": SeqLoRA, "none": Frozen}[config.family]
    return cls(config, sites)


__all__ = ["Method", "MethodConfig", "build_method", "method_config_from_dict", "METHOD_NAMES"]
