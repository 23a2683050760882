"""Method registry: one id per method everywhere (registry key, config file, output path, table column).

A method registers itself beside its config with :func:`register_method`; adding a method edits no
central file. Discovery imports every ``method`` module under ``masquant.methods`` and ``baselines``; a
module that fails to import is remembered with its error, which is raised (with the valid ids) when
that method is asked for.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

log = logging.getLogger(__name__)

_METHODS: dict[str, tuple[type, type]] = {}  # id -> (Method class, config dataclass)
_FAILED: dict[str, str] = {}  # module -> import error
_PACKAGES = ("masquant.methods", "baselines")
_discovered = False


def register_method(method_id: str, config: type):
    """Class decorator: ``@register_method("awq", config=AWQConfig)`` on the Method subclass."""

    def decorate(cls):
        if method_id in _METHODS and _METHODS[method_id][0] is not cls:
            raise KeyError(f"method id {method_id!r} is already registered by {_METHODS[method_id][0].__qualname__}")
        cls.id = method_id
        _METHODS[method_id] = (cls, config)
        return cls

    return decorate


def discover() -> None:
    """Import every ``<package>.<name>.method`` module (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for package in _PACKAGES:
        pkg = importlib.import_module(package)
        for info in pkgutil.iter_modules(pkg.__path__):
            if not info.ispkg:
                continue
            module = f"{package}.{info.name}.method"
            try:
                importlib.import_module(module)
            except ModuleNotFoundError as err:
                if err.name == module:
                    continue  # a helper package without a method
                _FAILED[module] = f"{type(err).__name__}: {err}"
                log.warning("method module %s failed to import: %s", module, err)
            except Exception as err:  # noqa: BLE001 - remembered and raised when that method is asked for
                _FAILED[module] = f"{type(err).__name__}: {err}"
                log.warning("method module %s failed to import: %s", module, err)


def method_ids() -> list[str]:
    discover()
    return sorted(_METHODS)


def _entry(method_id: str) -> tuple[type, type]:
    discover()
    if method_id not in _METHODS:
        failed = "".join(f"\n  {m}: {e}" for m, e in _FAILED.items())
        extra = f"; these method modules failed to import:{failed}" if failed else ""
        raise KeyError(f"unknown method {method_id!r}; valid methods: {method_ids()}{extra}")
    return _METHODS[method_id]


def get_method_class(method_id: str):
    return _entry(method_id)[0]


def get_config_class(method_id: str):
    return _entry(method_id)[1]


def build_method(method_cfg):
    """Instantiate a method from its (typed) config object, whose ``id`` names the method."""
    return get_method_class(method_cfg.id)(method_cfg)
