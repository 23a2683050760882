"""Method registry: one id per method everywhere (registry key, config file, output path, table column).

Entries are imported lazily; an import error is re-raised with the method id and the valid ids.
"""

from __future__ import annotations

import importlib

# id -> "module:Class" of the method and "module:Class" of its config dataclass
METHODS: dict[str, tuple[str, str]] = {
    "dense": ("baselines.dense.method:Dense", "baselines.dense.method:DenseConfig"),
    "rtn": ("baselines.rtn.method:RTN", "baselines.rtn.method:RTNConfig"),
    "smoothquant": ("baselines.smoothquant.method:SmoothQuant", "baselines.smoothquant.method:SmoothQuantConfig"),
    "masquant": ("masquant.methods.masquant.method:MASQuant", "masquant.methods.masquant.config:MASQuantConfig"),
}


def _load(target: str):
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def method_ids() -> list[str]:
    return sorted(METHODS)


def _entry(method_id: str) -> tuple[str, str]:
    if method_id not in METHODS:
        raise KeyError(f"unknown method {method_id!r}; valid methods: {method_ids()}")
    return METHODS[method_id]


def _import_entry(method_id: str, which: int, what: str):
    target = _entry(method_id)[which]
    try:
        return _load(target)
    except ImportError as err:
        raise ImportError(f"{what} of method {method_id!r} failed to import from {target}: {err}") from err


def get_method_class(method_id: str):
    return _import_entry(method_id, 0, "plugin")


def get_config_class(method_id: str):
    return _import_entry(method_id, 1, "config")


def build_method(method_cfg):
    """Instantiate a method from its (typed) config object, whose ``id`` names the method."""
    return get_method_class(method_cfg.id)(method_cfg)
