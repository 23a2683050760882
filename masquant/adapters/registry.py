"""Adapter registry keyed by Hugging Face ``model_type``."""

from __future__ import annotations

import torch.nn as nn

_ADAPTERS: dict[str, type] = {}


def register_adapter(cls):
    for model_type in cls.model_types:
        if model_type in _ADAPTERS:
            raise KeyError(f"model_type {model_type!r} already has adapter {_ADAPTERS[model_type].__name__}")
        _ADAPTERS[model_type] = cls
    return cls


def supported_model_types() -> list[str]:
    _load_builtin()
    return sorted(_ADAPTERS)


def _load_builtin() -> None:
    import masquant.adapters.families  # noqa: F401  (registers the built-in adapters)


def adapter_class_for(model_type: str):
    _load_builtin()
    if model_type not in _ADAPTERS:
        raise KeyError(
            f"no adapter for model_type {model_type!r}; supported model types: {sorted(_ADAPTERS)}. "
            "Add one in masquant/adapters/families.py (see README: 'Adding a model')."
        )
    return _ADAPTERS[model_type]


def get_adapter(model: nn.Module):
    return adapter_class_for(model.config.model_type)(model)
