"""Hydra entry point: ``python -m masquant [overrides]`` (also the ``masquant`` console script)."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: avoids spin-wait slowdowns on shared CPUs
os.environ.setdefault("WANDB_MODE", "offline")

from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from masquant.app.config import register_configs  # noqa: E402

log = logging.getLogger("masquant")
register_configs()


def invocation_configs(cfg: DictConfig) -> list[DictConfig]:
    """What one invocation runs: the dense reference (unless disabled or dense itself), then the run."""
    from masquant.app.pipeline import reference_config

    configs = [reference_config(cfg)] if cfg.reference and cfg.method.id != "dense" else []
    return configs + [cfg]


def invocation_problems(cfg: DictConfig) -> None:
    """Every check of an invocation that needs no model: each configuration's (``pipeline.resolve``) and the
    sweep objective's; raises ConfigError."""
    from masquant.app import pipeline
    from masquant.app.objective import objective_problems

    for c in invocation_configs(cfg):
        pipeline.resolve(c)  # every bad key, value or path fails here, before any model is loaded
    problems = objective_problems(cfg)
    if problems:
        raise pipeline.ConfigError("; ".join(problems))


def run_with_reference(cfg: DictConfig) -> list[dict]:
    """The dense reference (reused when finished) then the run; both are validated before either starts."""
    from masquant.app import pipeline

    invocation_problems(cfg)
    return [pipeline.run(c) for c in invocation_configs(cfg)]


CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """One job; returns ``sweep.objective`` of its result (what a sweeper such as Optuna optimises), or None."""
    from masquant.app.jobs import job_scope

    with job_scope():  # a sweep's jobs run in this process one after another
        return _job(cfg)


def _job(cfg: DictConfig) -> float | None:
    from masquant.calibration.data import CalibrationDataError
    from masquant.runs.environment import check_environment, drift_message, lock_path
    from masquant.app.pipeline import ConfigError
    from masquant.reporting import format_markdown, results_frame

    drifted = check_environment()
    if drifted:
        log.warning(drift_message(drifted, lock_path()))

    try:
        results = run_with_reference(cfg)
    except (ConfigError, CalibrationDataError) as err:
        log.error("configuration error: %s", err)
        if _in_multirun():
            raise  # the sweeper records the failed job and runs the others
        raise SystemExit(f"masquant: configuration error: {err}") from None
    table = format_markdown(results_frame(results))
    print("\n" + table + "\n")
    if cfg.logger.wandb:
        from masquant.app.pipeline import config_hash
        from masquant.runs.store import run_dir_for
        from masquant.reporting.wandb_log import log_to_wandb

        log_to_wandb(cfg, results, run_dir_for(cfg.paths.output_root, cfg.model.name, cfg.method.id, cfg.quant.name,
                                               config_hash(cfg)))
    from masquant.app.objective import objective_value

    return objective_value(cfg.sweep.objective, results[-1])


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


if __name__ == "__main__":
    main()
