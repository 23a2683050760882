"""The sweeper of ``python -m masquant -m ...``: Hydra's basic sweeper with two changes a sweep needs.

1. Before any job runs, every job's configuration (and its dense reference) goes through the same
   checks as a single run (``pipeline.resolve``: keys, values, paths, files). A bad value in job 7 of 40
   fails the sweep in seconds, listing every bad job, instead of after the first six jobs ran.
2. A job that fails while running does not stop the sweep: the other jobs run, and the sweep ends with
   the list of failed jobs and their errors (exit status 1). Re-running the command runs only what is
   missing (finished jobs skip themselves).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)


@dataclass
class MasquantSweeperConf:
    _target_: str = "hydra_plugins.masquant_sweeper.masquant_sweeper.MasquantSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[dict] = None


ConfigStore.instance().store(group="hydra/sweeper", name="masquant", node=MasquantSweeperConf)


class SweepError(SystemExit):
    """Ends the process with the sweep's failures (a SystemExit: Hydra prints no traceback)."""


def job_problems(job_cfg) -> list[str]:
    """ConfigErrors of one sweep job's configuration and of its dense reference (no model is loaded)."""
    from masquant.pipeline import ConfigError, resolve
    from masquant.run import invocation_configs

    cfg = job_cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    problems = []
    try:
        for c in invocation_configs(cfg):
            resolve(c)
    except ConfigError as err:
        problems.append(str(err))
    except Exception as err:  # noqa: BLE001 - e.g. an interpolation that does not resolve
        problems.append(f"{type(err).__name__}: {err}")
    return problems


class SweeperLogic(Sweeper):
    """Subclassed as hydra_plugins.masquant_sweeper.masquant_sweeper.MasquantSweeper (Hydra's plugin rule).

    Not a subclass of Hydra's BasicSweeper: Hydra re-imports its core plugins while scanning, so that
    class object is not stable; its static ``split_arguments`` (the cartesian product) is reused.
    """

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[dict] = None):
        super().__init__()
        self.max_batch_size = max_batch_size
        self.params = params or {}
        self.hydra_context = self.config = self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        super().validate_batch_is_legal(batch)  # every job composes (Hydra's own check)
        loader = self.hydra_context.config_loader
        bad = []
        for overrides in batch:
            job_cfg = loader.load_sweep_config(master_config=self.config, sweep_overrides=list(overrides))
            problems = job_problems(job_cfg)
            if problems:
                bad.append(f"  job {' '.join(overrides) or '(no overrides)'}:\n    " + "\n    ".join(problems))
        if bad:
            raise SweepError(f"masquant: {len(bad)} of {len(batch)} sweep jobs have configuration errors; "
                             "nothing was run:\n" + "\n".join(bad))

    def sweep(self, arguments: list[str]) -> Any:
        """Every job validated first; then the jobs run, and failed ones are collected instead of ending the sweep."""
        from pathlib import Path

        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
        from hydra.core.override_parser.overrides_parser import OverridesParser

        params = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        batches = BasicSweeper.split_arguments(parser.parse_overrides(params), self.max_batch_size)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        for batch in batches:
            self.validate_batch_is_legal(batch)
        returns, failed = [], []
        initial_job_idx = 0
        for batch in batches:
            results = self.launcher.launch(batch, initial_job_idx=initial_job_idx)
            for r in results:
                if r.status != JobStatus.COMPLETED:
                    err = r._return_value
                    failed.append((r.overrides, f"{type(err).__name__}: {err}"))
                    log.error("sweep job %s failed: %s: %s", " ".join(r.overrides or []), type(err).__name__, err)
            initial_job_idx += len(batch)
            returns.append(results)
        if failed:
            lines = "\n".join(f"  job {' '.join(o or [])}: {e}" for o, e in failed)
            raise SweepError(f"masquant: {len(failed)} of {initial_job_idx} sweep jobs failed (the others finished; "
                             f"re-running the command runs only what is missing):\n{lines}")
        return returns
