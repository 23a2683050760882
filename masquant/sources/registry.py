"""Registries of sources: ``model.source=<name>`` and ``calib.source=<name>`` name a registered source.

A source is a class registered with :func:`register_model_source` / :func:`register_calibration_source`; the
synthetic documents of a benchmark task (``eval.testbed_docs``) come from a function registered with
:func:`register_task_documents`; :func:`register_check` and :func:`register_provenance` add checks made before
any model loads (a system program a source needs) and entries recorded with every result.

Every module of this package registers its sources when the registry is first asked (:func:`discover`): the app
asks for a source by name and never imports one (the testbed in particular) itself. A module that fails to
import is remembered with its error, which is raised, with the valid names, when one of its sources is asked for.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from pathlib import Path
from typing import Any, Callable, ClassVar

from masquant.errors import ConfigError

log = logging.getLogger(__name__)

_PACKAGE = "masquant.sources"
_NOT_PLUGINS = {"registry", "loading"}


class ModelSource:
    """Where a model comes from. Subclasses set ``name`` and implement the three steps below."""

    name: ClassVar[str]
    # eval=testbed's tasks and generation cap for this model (None: the default five image tasks, no cap)
    testbed_tasks: ClassVar[tuple[str, ...] | None] = None
    testbed_generation_cap: ClassVar[int | None] = None
    # eval=testbed's cap on each task's new tokens: its answers' length in tokens with a margin ({}: none)
    testbed_answer_tokens: ClassVar[dict[str, int]] = {}

    def adapter_class(self, mcfg) -> type:
        """The model's adapter class, known before loading (ConfigError for a bad path or type)."""
        raise NotImplementedError

    def modalities(self, mcfg, adapter_cls: type) -> tuple[str, ...]:
        """The inputs the model takes ('text' first), known before loading."""
        raise NotImplementedError

    def load(self, mcfg, cache_dir: str | Path, dtype) -> tuple[Any, Any]:
        """(model in eval mode on the CPU, its processor)."""
        raise NotImplementedError


class CalibrationSource:
    """Where calibration prompts come from. Subclasses set ``name`` and give rows (or override ``sets``)."""

    name: ClassVar[str]
    has_answers: ClassVar[bool] = True  # rows can carry answers (calib.with_answers, methods that need them)
    text_only: ClassVar[bool] = False  # no image or audio inputs

    def check(self, cfg, needs_calibration: bool, needs_answers: str | None) -> None:
        """Raise ConfigError for what can be known wrong before loading (files, rows); ``needs_answers`` says who
        needs every row to carry an answer (e.g. "method=mbq"), or None."""

    def rows(self, ccfg, adapter_cls: type, n: int, held_out: int) -> tuple[list[dict], list[dict], dict]:
        """(calibration rows, held-out rows, a description recorded with the results), disjoint."""
        raise NotImplementedError

    def sets(self, cfg, processor, adapter):
        """(calibration set, held-out set, description) of a run: :meth:`rows` through the processor."""
        from masquant.calibration.data import CalibrationSet

        c = cfg.calib
        held_out = int(c.held_out) if cfg.eval.fidelity else 0
        calib_rows, held_rows, description = self.rows(c, type(adapter), int(c.n_samples), held_out)
        calib = CalibrationSet.from_rows(processor, calib_rows, description, with_answers=bool(c.with_answers))
        held = CalibrationSet.from_rows(processor, held_rows, description, desc="held-out prompts")
        return calib, held, description


_MODEL: dict[str, type[ModelSource]] = {}
_CALIB: dict[str, type[CalibrationSource]] = {}
_DOCS: dict[str, Callable[[int], list[dict]]] = {}
_CHECKS: list[Callable[[Any], list[str]]] = []
_PROVENANCE: list[Callable[[Any], dict]] = []
_FAILED: dict[str, str] = {}
_discovered = False


def _register(table: dict, cls: type, kind: str) -> type:
    if cls.name in table and table[cls.name] is not cls:
        raise KeyError(f"{kind} source {cls.name!r} is already registered by {table[cls.name].__qualname__}")
    table[cls.name] = cls
    return cls


def register_model_source(cls: type[ModelSource]) -> type[ModelSource]:
    """Class decorator: ``model.source=<cls.name>`` loads through ``cls``."""
    return _register(_MODEL, cls, "model")


def register_calibration_source(cls: type[CalibrationSource]) -> type[CalibrationSource]:
    """Class decorator: ``calib.source=<cls.name>`` calibrates on ``cls``'s rows."""
    return _register(_CALIB, cls, "calibration")


def register_task_documents(*tasks: str):
    """Decorator of ``fn(task, n) -> docs``: the synthetic documents of ``tasks`` (``eval.testbed_docs``)."""

    def decorate(fn):
        for task in tasks:
            _DOCS[task] = fn
        return fn

    return decorate


def register_check(fn: Callable[[Any], list[str]]):
    """``fn(cfg) -> problems``, run with the other checks before any model loads."""
    _CHECKS.append(fn)
    return fn


def register_provenance(fn: Callable[[Any], dict]):
    """``fn(cfg) -> {metric key: value}``, recorded with every result (e.g. a system program's version)."""
    _PROVENANCE.append(fn)
    return fn


def discover() -> None:
    """Import every plugin module of this package (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module(_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        if info.name in _NOT_PLUGINS or info.name.startswith("_"):
            continue
        module = f"{_PACKAGE}.{info.name}"
        try:
            importlib.import_module(module)
        except Exception as err:  # noqa: BLE001 - remembered and raised when one of its sources is asked for
            _FAILED[module] = f"{type(err).__name__}: {err}"
            log.warning("source module %s failed to import: %s", module, err)


def _value(x) -> str:
    return str(getattr(x, "value", x))


def _get(table: dict, name, key: str):
    discover()
    name = _value(name)
    if name not in table:
        failed = "".join(f"; {m} failed to import: {e}" for m, e in _FAILED.items())
        raise ConfigError(f"{key}={name!r}: no such source; valid choices are {sorted(table)}{failed}")
    return table[name]()


def model_source(name) -> ModelSource:
    """The registered ``model.source`` (ConfigError naming the valid ones when unknown)."""
    return _get(_MODEL, name, "model.source")


def calibration_source(name) -> CalibrationSource:
    """The registered ``calib.source`` (ConfigError naming the valid ones when unknown)."""
    return _get(_CALIB, name, "calib.source")


def model_source_names() -> list[str]:
    discover()
    return sorted(_MODEL)


def calibration_source_names() -> list[str]:
    discover()
    return sorted(_CALIB)


def task_documents(task: str) -> Callable[[str, int], list[dict]]:
    """The generator of ``task``'s synthetic documents (ConfigError when no source registers one)."""
    discover()
    if task not in _DOCS:
        raise ConfigError(f"eval.testbed_docs > 0 asks for synthetic documents of {task!r}, which no source makes "
                          f"(tasks with synthetic documents: {sorted(_DOCS)}); set eval.data_root to local task data")
    return _DOCS[task]


def documented_tasks() -> list[str]:
    discover()
    return sorted(_DOCS)


def source_problems(cfg) -> list[str]:
    """Every registered check's problems with ``cfg`` (system programs a source needs, ...)."""
    discover()
    return [p for check in _CHECKS for p in check(cfg)]


def source_provenance(cfg) -> dict:
    """Every registered provenance entry for ``cfg``."""
    discover()
    out: dict = {}
    for fn in _PROVENANCE:
        out.update(fn(cfg))
    return out
