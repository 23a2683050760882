"""Method registry: one id per method everywhere (registry key, config name, output path, table column).

A method registers itself beside its config with :func:`register_method`, which also gives its place in tables
(``order``); adding a method edits no central file. Discovery imports the ``method`` module of every folder of
the method packages (``masquant.methods``, ``baselines``, and the packages named in the environment variable
``MASQUANT_METHOD_PACKAGES``, comma-separated, for methods kept outside this repository); a module that fails to
import is remembered with its error, which is raised (with the valid ids) when that method is asked for.
"""

from __future__ import annotations

import importlib
import logging
import os
import pkgutil

log = logging.getLogger(__name__)

_METHODS: dict[str, tuple[type, type]] = {}  # id -> (Method class, config dataclass)
_FAILED: dict[str, str] = {}  # module -> import error
_PACKAGES = ("masquant.methods", "baselines")
PACKAGES_ENV = "MASQUANT_METHOD_PACKAGES"
_discovered = False


def register_method(method_id: str, config: type, order: int = 100):
    """Class decorator: ``@register_method("awq", config=AWQConfig, order=30)`` on the Method subclass.

    ``config``: the method's typed config (a dataclass with ``id`` as its first field, every default set);
    ``order``: its place in tables (lower first; ties by id).
    """

    def decorate(cls):
        if method_id in _METHODS and _METHODS[method_id][0] is not cls:
            raise KeyError(f"method id {method_id!r} is already registered by {_METHODS[method_id][0].__qualname__}")
        if getattr(config, "__dataclass_fields__", {}).get("id") is None or config().id != method_id:
            raise TypeError(f"{config.__qualname__} must be a dataclass whose field id defaults to {method_id!r}")
        cls.id, cls.config_class, cls.order = method_id, config, order
        _METHODS[method_id] = (cls, config)
        return cls

    return decorate


def discover() -> None:
    """Import every ``<package>.<name>.method`` module (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    extra = [p.strip() for p in os.environ.get(PACKAGES_ENV, "").split(",") if p.strip()]
    for package in (*_PACKAGES, *extra):
        try:
            pkg = importlib.import_module(package)
        except Exception as err:  # noqa: BLE001 - remembered like a failed method module
            _FAILED[package] = f"{type(err).__name__}: {err} (from {PACKAGES_ENV})"
            log.warning("method package %s failed to import: %s", package, err)
            continue
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
    """Every registered method id, in table order (``order``, then id)."""
    discover()
    return sorted(_METHODS, key=lambda m: (_METHODS[m][0].order, m))


def method_order(method_id: str) -> tuple[int, str]:
    """Sort key of a method id in tables: its registered ``order``; unregistered ids last."""
    discover()
    return (_METHODS[method_id][0].order, method_id) if method_id in _METHODS else (10**9, method_id)


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
