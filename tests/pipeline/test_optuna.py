"""hydra/sweeper=optuna with the conf/sweep/optuna_*.yaml overlays: each trial is an ordinary run whose app returns
sweep.objective; the search maximises (or minimises) it and a relaunch replays finished trials from the cache."""

from __future__ import annotations

import json

import pytest
import yaml
from support.cli import cli, loads  # noqa: F401  (fixtures)

TINY = ["model=tiny_qwen25vl", "calib=tiny", "eval=fidelity", "calib.n_samples=2", "calib.held_out=1", "eval.ppl=false"]


@pytest.mark.parametrize("overlay,method,objective,direction", [
    ("optuna_smoothquant_alpha", "smoothquant", "fidelity/sqnr/all/e2e", "maximize"),
    ("optuna_cmc_rank", "masquant", "fidelity/sqnr/vision/e2e", "maximize"),
])
def test_optuna_overlays_compose(compose_cfg, overlay, method, objective, direction):
    cfg = compose_cfg("hydra/sweeper=optuna", f"sweep={overlay}", return_hydra_config=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper") and cfg.method.id == method
    assert cfg.sweep.objective == objective and cfg.hydra.sweeper.direction == direction
    cfg = compose_cfg("hydra/sweeper=optuna", f"sweep={overlay}", "sweep.objective=fidelity/ppl_delta",
                      return_hydra_config=True)
    assert cfg.hydra.sweeper.direction == "minimize"  # the direction follows the objective


def test_optuna_search_maximises_the_objective_and_replays_from_the_cache(cli, tmp_path):
    args = ["-m", "hydra/sweeper=optuna", "sweep=optuna_smoothquant_alpha", "hydra.sweeper.n_trials=3",
            "hydra.sweeper.sampler.n_startup_trials=2", *TINY, "quant=w4a8", f"paths.output_root={tmp_path}/o",
            f"hydra.sweep.dir={tmp_path}/sw"]
    code, out = cli(*args)
    assert code == 0, out[-3000:]
    best = yaml.safe_load((tmp_path / "sw" / "optimization_results.yaml").read_text())
    trials = [json.loads(p.read_text()) for p in (tmp_path / "o" / "runs").rglob("smoothquant/*/metrics.json")]
    assert 1 <= len(trials) <= 3
    by_alpha = {t["run/method_label"]: t["fidelity/sqnr/all/e2e"] for t in trials}
    assert best["best_value"] == max(by_alpha.values())
    best_label = "smoothquant" if best["best_params"]["method.alpha"] == 0.5 else \
        f"smoothquant(alpha={best['best_params']['method.alpha']})"
    assert by_alpha[best_label] == best["best_value"]
    code, again = cli(*args)  # the seeded search suggests the same alphas: every trial is a finished result
    assert code == 0 and "results: " not in again
    assert yaml.safe_load((tmp_path / "sw" / "optimization_results.yaml").read_text()) == best


def test_optuna_objective_the_run_cannot_produce_fails_the_trial_before_any_work(cli, loads, tmp_path):
    code, out = cli("-m", "hydra/sweeper=optuna", "sweep=optuna_smoothquant_alpha", "hydra.sweeper.n_trials=1",
                    *TINY, "sweep.objective=fidelity/ppl", f"paths.output_root={tmp_path}/o",
                    f"hydra.sweep.dir={tmp_path}/sw")
    assert code != 0 and loads == [] and "sweep.objective='fidelity/ppl' needs eval.ppl=true" in out
