"""Every experiment (a paper table as a config) composes with every job of its sweep; its testbed version validates
every job without loading a model and smoke-runs on the tiny model (default) and on the testbed (slow)."""

from pathlib import Path

import pytest

from masquant.app import pipeline
from masquant.methods.registry import get_config_class, method_ids
from masquant.reporting.paper import LAYOUTS, PAPER_METHODS, option_values
from masquant.app.main import CONF_DIR, invocation_problems
from masquant.sweep.sweeper import configured_jobs, inapplicable, method_of

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
    assert missing <= set(PAPER_METHODS), f"{experiment}: unknown method ids {missing}"
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


def _stated(experiment: str) -> set[str]:
    """``group.key`` of calib and eval that the experiment's file, or an experiment it extends, sets."""
    import yaml

    data = yaml.safe_load(Path(CONF_DIR, "experiment", f"{experiment}.yaml").read_text())
    stated = {f"{g}.{k}" for g in ("calib", "eval") for k in (data.get(g) or {})}
    for parent in [d for d in data.get("defaults", []) if isinstance(d, str) and d in EXPERIMENTS]:
        stated |= _stated(parent)
    return stated


def _cells(compose_cfg, experiment) -> set[tuple[str, str]]:
    cfg = compose_cfg(f"experiment={experiment}", return_hydra_config=True)
    return {(method_of(j), dict(o.split("=", 1) for o in j).get("quant", str(cfg.quant.name))) for j in configured_jobs(cfg)}


@pytest.mark.parametrize("experiment", PAPER)
def test_paper_experiment_sets_its_calibration_and_limit_and_has_a_testbed_version(compose_cfg, experiment):
    """A paper table's experiment states its calibration set and evaluation limit as keys of its own file (not
    inherited defaults), and a testbed experiment (``sweep.testbed_of``) runs every one of its (method, scheme)
    cells on the testbed."""
    assert {"calib.n_samples", "calib.seed", "eval.limit"} <= _stated(experiment), experiment
    versions = [t for t in TESTBED if compose_cfg(f"experiment={t}").sweep.testbed_of == experiment]
    assert versions, f"no testbed experiment has sweep.testbed_of={experiment}"
    paper = {cell for cell in _cells(compose_cfg, experiment) if cell[0] in method_ids()}
    assert paper <= set().union(*(_cells(compose_cfg, t) for t in versions)), experiment


@pytest.mark.parametrize("experiment", TESTBED)
def test_testbed_of_names_a_paper_experiment(compose_cfg, experiment):
    testbed_of = compose_cfg(f"experiment={experiment}").sweep.testbed_of
    assert testbed_of is None or testbed_of in PAPER, (experiment, testbed_of)


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
    import masquant.sources.loading as models

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

