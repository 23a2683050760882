"""Every experiment (a paper table as a config) composes with every job of its sweep; its testbed version validates
every job without loading a model and smoke-runs on the tiny model (default) and on the testbed (slow)."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from masquant import pipeline
from masquant.registry import get_config_class, method_ids
from masquant.reporting.paper import LAYOUTS, METHOD_ORDER, option_values
from masquant.run import CONF_DIR, invocation_problems
from masquant.sweeper import configured_jobs, inapplicable, method_of

EXPERIMENTS = sorted(p.stem for p in Path(CONF_DIR, "experiment").glob("*.yaml"))
TESTBED = [e for e in EXPERIMENTS if e.endswith("_testbed")]
PAPER = [e for e in EXPERIMENTS if not e.endswith("_testbed")]
TINY = ["model=tiny_qwen25vl", "model.path=null", "calib=tiny", "eval=fidelity", "calib.n_samples=2",
        "calib.held_out=1", "eval.tasks=[]"]


def registered_jobs(compose_cfg, experiment, *extra):
    """The jobs of the experiment's sweep whose method is registered here (the others are the paper's methods that
    land from other branches)."""
    cfg = compose_cfg(f"experiment={experiment}", *extra, return_hydra_config=True)
    jobs = configured_jobs(cfg)
    missing = {method_of(j) for j in jobs} - set(method_ids()) - {None}
    assert missing <= set(METHOD_ORDER), f"{experiment}: unknown method ids {missing}"
    jobs = [j for j in jobs if method_of(j) in (None, *method_ids())]
    if cfg.hydra.sweeper.get("drop_inapplicable"):  # the sweeper drops the schemes a method cannot run
        jobs = [j for j in jobs if inapplicable(compose_cfg(f"experiment={experiment}", *extra, *j)) is None]
    return jobs


def _check_sweep_settings(cfg, experiment):
    assert cfg.sweep.table in (None, *LAYOUTS)
    options = option_values(get_config_class(str(cfg.method.id))())
    assert all(p in options for p in cfg.sweep.pivot), (experiment, list(cfg.sweep.pivot))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_is_a_global_overlay(experiment):
    assert Path(CONF_DIR, "experiment", f"{experiment}.yaml").read_text().startswith("# @package _global_\n")


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_experiment_and_every_job_of_its_sweep_compose(compose_cfg, experiment):
    """(The jobs of the testbed versions are composed and validated by the test below.)"""
    jobs = registered_jobs(compose_cfg, experiment)
    assert jobs
    for job in jobs:
        _check_sweep_settings(compose_cfg(f"experiment={experiment}", *job), experiment)


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_experiment_states_its_settings_and_has_a_testbed_version(experiment):
    text = Path(CONF_DIR, "experiment", f"{experiment}.yaml").read_text()
    for said in ("Calibration", "Evaluation", "Limit used"):
        assert said in text, f"{experiment}.yaml does not state its {said.lower()}"
    versions = [e for e in TESTBED
                if f"Testbed version of {experiment} " in Path(CONF_DIR, "experiment", f"{e}.yaml").read_text()]
    assert versions, f"no *_testbed.yaml says it is the testbed version of {experiment}"


def test_paper_table1_sweeps_the_papers_cells(compose_cfg):
    cfg = compose_cfg("experiment=table1_qwen25vl", return_hydra_config=True)
    cells = {(dict(o.split("=") for o in j)["method"], dict(o.split("=") for o in j)["quant"])
             for j in configured_jobs(cfg)}
    assert len(cells) == 16 and ("awq", "w4a16_g128") in cells and ("smoothquant", "w4a16_g128") not in cells
    assert {m for m, _ in cells} == {"rtn", "smoothquant", "awq", "mbq", "masquant"}
    assert cfg.eval.limit == 0.1 and cfg.calib.n_samples == 128 and cfg.calib.seed == 2
    assert cfg.model.path == f"{cfg.paths.models_root}/Qwen2.5-VL-3B-Instruct"


@pytest.mark.parametrize("experiment", TESTBED)
def test_testbed_experiment_validates_every_job_without_a_model(compose_cfg, experiment, monkeypatch):
    import masquant.models as models

    monkeypatch.setattr(models, "load_model_and_processor", lambda *a, **k: pytest.fail("a model was loaded"))
    for job in registered_jobs(compose_cfg, experiment):
        cfg = compose_cfg(f"experiment={experiment}", *job)
        _check_sweep_settings(cfg, experiment)
        invocation_problems(cfg)


def _smoke(compose_cfg, experiment, shrink):
    job = registered_jobs(compose_cfg, experiment, *shrink)[0]
    cfg = compose_cfg(f"experiment={experiment}", *job, *shrink)
    extra = ["method.epochs=1", "method.n_learn_samples=1"] if cfg.method.id == "masquant" else []
    metrics = pipeline.run(compose_cfg(f"experiment={experiment}", *job, *shrink, *extra, "reference=false"))
    assert metrics["run/method"] == cfg.method.id
    return metrics


@pytest.mark.parametrize("experiment", TESTBED)
def test_testbed_experiment_smoke_runs_on_the_tiny_model(compose_cfg, experiment):
    shrink = TINY if experiment != "table2_testbed" else []  # table2_testbed runs the tiny Omni thinker already
    if experiment == "table3_omni_testbed":  # tri-modal: the tiny Omni thinker
        shrink = ["model=tiny_qwen25omni", *TINY[1:]]
    metrics = _smoke(compose_cfg, experiment, shrink)
    assert metrics["fidelity/sqnr/all/e2e"] > 0
    if experiment == "table2_testbed":
        assert metrics["fidelity/sqnr/audio/e2e"] > 0 and metrics["run/modalities"] == ["text", "vision", "audio"]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", [e for e in TESTBED if e != "table2_testbed"])
def test_testbed_experiment_smoke_runs_on_the_testbed(compose_cfg, experiment):
    """The first job of each testbed sweep on the testbed itself, with a tiny limit (2 documents per task)."""
    metrics = _smoke(compose_cfg, experiment, ["eval.testbed_docs=2", "calib.n_samples=2", "calib.held_out=2",
                                               "eval.ppl_sequences=2"])
    assert metrics["fidelity/sqnr/all/e2e"] > 0 and any(k.startswith("eval/") for k in metrics)

