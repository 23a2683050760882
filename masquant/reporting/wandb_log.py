"""One wandb run per job: its configuration and provenance, its metrics, and its results table.

Offline by default (``logger=wandb``: no account, no network; ``wandb sync`` uploads later), online with
``logger=wandb_online``, off with ``logger=none`` or ``WANDB_MODE=disabled`` in the environment. A result is
logged once: the wandb run's id is kept in ``<run_dir>/wandb.json``, so a resumed sweep does not log the
jobs that had finished again. A logging failure is reported and never loses the result (already saved).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from masquant.runs.store import write_json_atomic
from masquant.reporting.table import results_frame

log = logging.getLogger(__name__)
MARKER = "wandb.json"


def wandb_mode(cfg: DictConfig) -> str:
    """The logger's mode, unless the environment disables wandb (``WANDB_MODE=disabled``)."""
    return "disabled" if os.environ.get("WANDB_MODE") == "disabled" else str(cfg.logger.wandb_mode)


def _finite_numbers(metrics: dict) -> dict[str, float]:
    return {k: v for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _table_rows(results: list[dict]) -> tuple[list[str], list[list]]:
    """The invocation's table (dense reference + job) with non-finite numbers (a dense SQNR of inf) as None."""
    df = results_frame(results)
    rows = [[None if isinstance(v, float) and not math.isfinite(v) else v for v in row]
            for row in df.astype(object).where(df.notna(), None).values.tolist()]
    return [str(c) for c in df.columns], rows


def log_to_wandb(cfg: DictConfig, results: list[dict], run_dir: Path | None = None) -> Path | None:
    """Log the job's result (``results[-1]``; ``results`` also holds its dense reference) as one wandb run.

    Returns the wandb run folder, or None when nothing was logged (disabled, already logged, or failed)."""
    metrics = results[-1]
    run_dir = Path(run_dir) if run_dir is not None else None
    if run_dir is not None and (run_dir / MARKER).exists():
        log.info("wandb: %s was logged already (%s)", run_dir.name, run_dir / MARKER)
        return None
    mode = wandb_mode(cfg)
    if mode == "disabled":
        return None
    try:
        import wandb

        provenance = {k.removeprefix("provenance/"): v for k, v in metrics.items() if k.startswith("provenance/")}
        config = {**OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "provenance": provenance}
        config.pop("hydra", None)
        root = Path(cfg.paths.output_root)
        root.mkdir(parents=True, exist_ok=True)
        label = metrics.get("run/method_label", metrics.get("run/method"))
        run = wandb.init(project=str(cfg.logger.project), mode=mode, dir=str(root), config=config,
                         name=f"{metrics.get('run/model')}/{label}/{metrics.get('run/quant')}-{metrics.get('run/config_hash')}",
                         group=str(metrics.get("run/model")), job_type=str(metrics.get("run/method")),
                         tags=[str(metrics.get("run/method")), str(metrics.get("run/bits"))], reinit="finish_previous")
        columns, rows = _table_rows(results)
        run.log({**_finite_numbers(metrics), "results": wandb.Table(columns=columns, data=rows)})
        folder = Path(run.dir).parent  # <root>/wandb/<offline-run-...>/files -> the run folder
        run_id = run.id
        run.finish()
    except Exception as err:  # noqa: BLE001 - the result is saved; wandb is a copy
        log.error("wandb logging failed (the result is saved in %s): %s: %s", run_dir, type(err).__name__, err)
        return None
    if run_dir is not None:
        write_json_atomic({"id": run_id, "mode": mode, "folder": str(folder)}, run_dir / MARKER)
    log.info("wandb run %s (%s): %s", run_id, mode, folder)
    return folder
