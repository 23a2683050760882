"""Every experiment overlay smoke-runs: the first job of its sweep, shrunk to the tiny model."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from masquant import pipeline
from masquant.run import CONF_DIR

EXPERIMENTS = sorted(Path(CONF_DIR, "experiment").glob("*.yaml"))
SHRINK = ["model=tiny_qwen25vl", "calib=tiny", "eval=fidelity", "calib.n_samples=2", "calib.held_out=1"]
SHRINK_AUDIO = ["model=tiny_qwen25omni", *SHRINK[1:]]  # tri-modal experiments need a model with audio


def shrink(path: Path) -> list[str]:
    defaults = OmegaConf.to_container(OmegaConf.load(path)).get("defaults", [])
    modality = next((d.get("override /modality") for d in defaults
                     if isinstance(d, dict) and "override /modality" in d), None)
    return SHRINK_AUDIO if modality == "text_vision_audio" else SHRINK


def first_sweep_job(path: Path) -> list[str]:
    params = OmegaConf.select(OmegaConf.load(path), "hydra.sweeper.params") or {}
    return [f"{key}={str(values).split(',')[0]}" for key, values in params.items()]


@pytest.mark.slow
@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.stem for p in EXPERIMENTS])
def test_experiment_smoke_runs(compose_cfg, path):
    overrides = [f"experiment={path.stem}", *shrink(path), *first_sweep_job(path)]
    cfg = compose_cfg(*overrides)
    if cfg.method.id == "masquant":
        cfg = compose_cfg(*overrides, "method.epochs=1")
    metrics = pipeline.run(cfg)
    assert metrics["run/method"] == cfg.method.id
    assert metrics["fidelity/sqnr/all/e2e"] > 0
