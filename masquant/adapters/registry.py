"""Adapter registry keyed by Hugging Face ``model_type``."""

from __future__ import annotations

import torch.nn as nn

_ADAPTERS: dict[str, type] = {}


def register_adapter(cls):
    for model_type in cls.model_types:
        if model_type in _ADAPTERS and _ADAPTERS[model_type] is not cls:
            raise KeyError(f"model_type {model_type!r} already has adapter {_ADAPTERS[model_type].__name__}")
        _ADAPTERS[model_type] = cls
    return cls


def _load_builtin() -> None:
    import masquant.adapters.families  # noqa: F401  (registers the built-in adapters)


def supported_model_types() -> list[str]:
    _load_builtin()
    return sorted(_ADAPTERS)


def adapter_classes() -> dict[str, type]:
    """{first model_type: adapter class}, one entry per adapter (e.g. for tests over every family)."""
    _load_builtin()
    out: dict[str, type] = {}
    for cls in _ADAPTERS.values():
        out.setdefault(cls.model_types[0], cls)
    return out


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
