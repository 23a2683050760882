"""Optional wandb logging (offline by default; `wandb sync` later)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf


def log_to_wandb(cfg: DictConfig, metrics: dict) -> None:
    import wandb

    run = wandb.init(project=cfg.logger.project, mode=cfg.logger.wandb_mode, dir=cfg.paths.output_root,
                     config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
                     name=f"{metrics.get('run/method')}-{metrics.get('run/quant')}-{metrics.get('run/config_hash')}")
    run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    run.finish()
