"""Fixtures for tests that run ``python -m masquant`` in this process (imported by the test modules that use them)."""

from __future__ import annotations

import sys

import pytest
from hydra.core.global_hydra import GlobalHydra


@pytest.fixture
def loads(monkeypatch):
    """Counts model loads (the expensive step every early check must precede)."""
    import masquant.sources.loading as models

    count = []
    real = models.load_model_and_processor
    monkeypatch.setattr(models, "load_model_and_processor", lambda *a, **k: count.append(1) or real(*a, **k))
    return count


@pytest.fixture
def cli(monkeypatch, tmp_path, capsys):
    """cli(*overrides) -> (exit status, stdout + stderr) of ``python -m masquant`` run in this process."""

    def _cli(*overrides: str):
        from masquant.app.main import main

        GlobalHydra.instance().clear()
        flags = [o for o in overrides if o.startswith("-")]
        rest = [o for o in overrides if not o.startswith("-")]
        monkeypatch.setattr(sys, "argv", ["masquant", *flags, "hydra.verbose=false",
                                          f"paths.cache_dir={tmp_path}/cache", *rest])
        code = 0
        try:
            main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
            if not isinstance(exc.code, int):
                print(exc.code, file=sys.stderr)
        finally:
            GlobalHydra.instance().clear()
        out = capsys.readouterr()
        return code, out.out + out.err

    return _cli
