"""What a sweep runs (grids, methods not registered here, schemes a method cannot run), what its jobs share
(the dense reference, the calibration statistics), what they must not share (global state), and the reproduce
script resuming after SIGKILL."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.cli import cli, loads  # noqa: F401  (fixtures)

from masquant.sweep.sweeper import method_of, sweep_jobs

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model=tiny_qwen25vl", "calib=tiny", "eval=fidelity", "calib.n_samples=2", "calib.held_out=1", "eval.ppl=false"]


def _finished(root: Path) -> list[str]:
    """The finished runs under ``root`` (model/method/quant), read while a sweep may be renaming folders there."""
    for _ in range(100):
        try:
            return sorted(p.parent.relative_to(root / "runs").as_posix().rsplit("-", 1)[0]
                          for p in (root / "runs").rglob("metrics.json")) if (root / "runs").exists() else []
        except FileNotFoundError:  # a folder went away during the scan
            continue
    return []


@pytest.fixture
def awq_mbq_unregistered(monkeypatch):
    """A checkout where AWQ and MBQ (paper methods) are not registered, e.g. a branch before they landed."""
    from masquant.methods import registry

    registry.discover()
    for method_id in ("awq", "mbq"):
        monkeypatch.delitem(registry._METHODS, method_id)
    return ", ".join(registry.method_ids())


# --- which jobs --------------------------------------------------------------------------------------------
def test_grids_are_a_union_of_products_and_the_command_line_wins():
    grids = [{"method": "rtn,awq", "quant": "w4a16_g128"}, {"method": "rtn,smoothquant", "quant": "w8a8,w4a8"}]
    assert sweep_jobs({"model": "m"}, grids, []) == [
        ["model=m", "method=rtn", "quant=w4a16_g128"], ["model=m", "method=awq", "quant=w4a16_g128"],
        ["model=m", "method=rtn", "quant=w8a8"], ["model=m", "method=rtn", "quant=w4a8"],
        ["model=m", "method=smoothquant", "quant=w8a8"], ["model=m", "method=smoothquant", "quant=w4a8"]]
    # a command-line value replaces the grids' (as it replaces params in Hydra's basic sweeper); duplicates run once
    assert sweep_jobs({"model": "m"}, grids, ["quant=w4a8", "seed=0,1"]) == [
        ["model=m", "method=rtn", "quant=w4a8", "seed=0"], ["model=m", "method=rtn", "quant=w4a8", "seed=1"],
        ["model=m", "method=awq", "quant=w4a8", "seed=0"], ["model=m", "method=awq", "quant=w4a8", "seed=1"],
        ["model=m", "method=smoothquant", "quant=w4a8", "seed=0"],
        ["model=m", "method=smoothquant", "quant=w4a8", "seed=1"]]
    assert sweep_jobs(None, None, ["method=rtn"]) == [["method=rtn"]]


def test_a_method_not_registered_here_is_named_before_anything_runs(cli, loads, tmp_path, awq_mbq_unregistered):
    code, out = cli("-m", *TINY, f"paths.output_root={tmp_path}/o", "method=rtn,awq", "quant=w4a16_g128",
                    f"hydra.sweep.dir={tmp_path}/sw")
    assert code != 0 and loads == [] and "Traceback" not in out
    assert "1 of 2 sweep jobs have configuration errors" in out
    assert f"method=awq is not registered in this checkout (registered: {awq_mbq_unregistered})" in out
    assert "hydra.sweeper.drop_unregistered=true" in out
    assert not (tmp_path / "o" / "runs").exists()


def test_drop_unregistered_runs_the_registered_methods_and_names_the_others(cli, tmp_path, awq_mbq_unregistered):
    code, out = cli("-m", *TINY, f"paths.output_root={tmp_path}/o", "method=rtn,awq,mbq", "quant=w4a16_g128",
                    "hydra.sweeper.drop_unregistered=true", f"hydra.sweep.dir={tmp_path}/sw")
    assert code == 0, out[-3000:]
    assert _finished(tmp_path / "o") == ["tiny-qwen2.5-vl/dense/fp16", "tiny-qwen2.5-vl/rtn/w4a16_g128"]
    record = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [method_of(d["job"]) for d in record["dropped"]] == ["awq", "mbq"]
    assert "not run: method=awq: method=awq is not registered" in (tmp_path / "sw" / "table.md").read_text()


def test_a_misspelt_method_is_an_error_even_when_dropping_unregistered_ones(cli, loads, tmp_path):
    code, out = cli("-m", *TINY, f"paths.output_root={tmp_path}/o", "method=rtn,smothquant",
                    "hydra.sweeper.drop_unregistered=true", f"hydra.sweep.dir={tmp_path}/sw")
    assert code != 0 and loads == []
    assert "method=smothquant is not registered in this checkout" in out and "drop_unregistered" not in out


def test_drop_inapplicable_skips_a_scheme_the_method_cannot_run(cli, tmp_path):
    code, out = cli("-m", *TINY, f"paths.output_root={tmp_path}/o", "method=rtn,smoothquant", "quant=w4a16_g128",
                    "hydra.sweeper.drop_inapplicable=true", f"hydra.sweep.dir={tmp_path}/sw")
    assert code == 0, out[-3000:]
    assert _finished(tmp_path / "o") == ["tiny-qwen2.5-vl/dense/fp16", "tiny-qwen2.5-vl/rtn/w4a16_g128"]
    (dropped,) = json.loads((tmp_path / "sw" / "sweep.json").read_text())["dropped"]
    assert method_of(dropped["job"]) == "smoothquant" and "weight-only" in dropped["why"]


def test_dry_run_lists_the_valid_jobs_and_runs_nothing(cli, loads, tmp_path, awq_mbq_unregistered):
    code, out = cli("-m", *TINY, f"paths.output_root={tmp_path}/o", "method=rtn,awq", "quant=w8a8,w4a8",
                    "hydra.sweeper.drop_unregistered=true", "hydra.sweeper.dry_run=true", f"hydra.sweep.dir={tmp_path}/sw")
    assert code == 0 and loads == [] and not (tmp_path / "o" / "runs").exists()
    assert "dry run: 2 jobs valid (0 of their 3 results, dense references included, already finished)" in out
    assert "#0: method=rtn quant=w8a8\n  #1: method=rtn quant=w4a8" in out and "not run: method=awq quant=w8a8" in out


# --- what jobs share, and what they must not ---------------------------------------------------------------
def test_a_two_job_sweep_shares_the_reference_and_computes_statistics_once(cli, tmp_path, monkeypatch):
    from masquant.app import pipeline
    from masquant.calibration.cache import StatsCache

    saved, loaded, computed = [], [], []
    real_save, real_load, real_run = StatsCache.save, StatsCache.load, pipeline._run_locked
    monkeypatch.setattr(StatsCache, "save", lambda self, key, state: saved.append(key) or real_save(self, key, state))
    monkeypatch.setattr(StatsCache, "load", lambda self, key: (lambda s: loaded.append(s is not None) or s)(
        real_load(self, key)))
    monkeypatch.setattr(pipeline, "_run_locked", lambda spec: computed.append(spec.cfg.method.id) or real_run(spec))
    code, out = cli("-m", *TINY, f"paths.output_root={tmp_path}/o", "method=smoothquant", "quant=w8a8,w4a8",
                    f"hydra.sweep.dir={tmp_path}/sw")
    assert code == 0, out[-3000:]
    assert computed == ["dense", "smoothquant", "smoothquant"]  # the dense reference ran once, for both jobs
    assert len(saved) == 1 and loaded == [False, True]  # statistics computed by job 1, loaded by job 2
    assert len(list((tmp_path / "cache" / "stats").glob("*.pt"))) == 1


def test_job_scope_undoes_what_a_job_changed(tmp_path):
    from masquant.app.jobs import job_scope

    root = logging.getLogger()
    before, threads = list(root.handlers), torch.get_num_threads()
    with job_scope():
        handler = logging.FileHandler(tmp_path / "job.log")
        root.addHandler(handler)
        torch.set_num_threads(1)
        torch.rand(5)  # a job that draws random numbers without seeding
    assert root.handlers == before and handler.stream is None  # removed and closed
    assert torch.get_num_threads() == threads
    after_job = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(after_job, torch.rand(3))  # the generators are back at seed 0 for the next job


def test_a_job_returns_its_objective(compose_cfg, tmp_path):
    from masquant.app.main import _job

    cfg = compose_cfg(*TINY, "method=rtn", "quant=w8a8", "sweep.objective=fidelity/sqnr/vision/e2e", "logger=none")
    value = _job(cfg)
    result = json.loads(next((tmp_path / "outputs" / "runs").rglob("rtn/*/metrics.json")).read_text())
    assert value == result["fidelity/sqnr/vision/e2e"] and 10 < value < 80
    assert _job(compose_cfg(*TINY, "method=rtn", "quant=w8a8", "logger=none")) is None


def test_an_objective_the_run_cannot_produce_fails_before_any_work(cli, loads, tmp_path):
    code, out = cli(*TINY, f"paths.output_root={tmp_path}/o", "sweep.objective=fidelity/ppl")
    assert code != 0 and loads == [] and "sweep.objective='fidelity/ppl' needs eval.ppl=true" in out


# --- the reproduce script resumes ----------------------------------------------------------------------------
def test_reproduce_runs_the_sweep_writes_the_table_and_figures_then_resumes(tmp_path, capsys, monkeypatch):
    sys.path.insert(0, str(ROOT))
    from experiments.reproduce import main as reproduce

    args = ["table1_testbed", *TINY, "model.path=null", "eval.tasks=[]", "hydra.sweeper.grids=[{method:masquant}]",
            "method=masquant", "quant=w4a8", "method.epochs=1", f"paths.output_root={tmp_path}/o", f"paths.cache_dir={tmp_path}/c",
            "hydra.verbose=false", "logger=none"]
    assert reproduce(args) == 0
    sweep = tmp_path / "o" / "tables" / "table1_testbed"
    assert {p.name for p in sweep.iterdir()} >= {"table.md", "table.tex", "table.csv", "runs.md", "sweep.json"}
    figures = sorted(p.name for p in (sweep / "plots").glob("*_layer*.png"))
    assert figures == ["channel_absmax_layer1.png", "cmc_rank_energy_layer1.png"]
    first = capsys.readouterr().out
    assert "masquant(epochs=1) | 2 | all | 1 |" in first and "MASQuant figures" in first
    assert reproduce(args) == 0  # everything finished: nothing runs again, the figures are kept
    again = capsys.readouterr()
    assert "results: " not in again.out + again.err and "MASQuant figures" not in again.out
    assert _finished(tmp_path / "o") == ["tiny-qwen2.5-vl/dense/fp16", "tiny-qwen2.5-vl/masquant/w4a8"]


@pytest.mark.slow
def test_reproduce_killed_mid_sweep_resumes_with_each_result_once(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [sys.executable, "experiments/reproduce.py", "table1_testbed", "--no-figures", *TINY, "model.path=null",
           "eval.tasks=[]", "hydra.sweeper.grids=[{method:rtn}]", "quant=w8a8,w4a8,w4a4", f"paths.output_root={out}",
           f"paths.cache_dir={tmp_path}/cache", "hydra.verbose=false"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while proc.poll() is None and len(_finished(out)) < 2 and time.monotonic() - t0 < 200:
        time.sleep(0.02)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 2 <= len(_finished(out)) < 4
    final = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert _finished(out) == ["tiny-qwen2.5-vl/dense/fp16", "tiny-qwen2.5-vl/rtn/w4a4", "tiny-qwen2.5-vl/rtn/w4a8",
                              "tiny-qwen2.5-vl/rtn/w8a8"]
    assert [p for p in (out / "runs").rglob(".*") if p.is_dir()] == []  # no partial or failed folder left
    assert final.stdout.count("finished result found") + final.stderr.count("finished result found") >= 2
    table = (out / "tables" / "table1_testbed" / "table.md").read_text()
    assert table.count("| tiny-qwen2.5-vl |") == 4 and "beside Qwen2.5-VL-3B" in table


# --- seeds ---------------------------------------------------------------------------------------------------
def test_seeds_run_every_job_per_seed_and_set_the_method_seed_where_it_has_one(cli, tmp_path):
    code, out = cli("-m", *TINY, f"paths.output_root={tmp_path}/o", "method=rtn,quarot", "quant=w4a8",
                    "hydra.sweeper.seeds=[0,1]", "hydra.sweeper.dry_run=true", f"hydra.sweep.dir={tmp_path}/sw")
    assert code == 0, out[-3000:]
    listed = out[out.index("dry run: "):]
    assert "dry run: 4 jobs valid" in listed
    for job in ("method=rtn seed=0", "method=rtn seed=1", "method=quarot seed=0 method.seed=0",
                "method=quarot seed=1 method.seed=1"):
        assert job in listed, listed


def test_a_seeded_sweep_makes_one_row_per_configuration_with_what_varied(cli, tmp_path):
    from masquant.reporting.paper import format_paper_markdown, paper_table
    from masquant.reporting.table import collect_results

    code, out = cli("-m", *TINY, f"paths.output_root={tmp_path}/o", "method=quarot", "quant=w4a8",
                    "hydra.sweeper.seeds=[0,1]", f"hydra.sweep.dir={tmp_path}/sw")
    assert code == 0, out[-3000:]
    results = collect_results(tmp_path / "o" / "runs")
    quarot = [r for r in results if r["run/method"] == "quarot"]
    assert sorted(r["run/method_label"] for r in quarot) == ["quarot", "quarot(seed=1)"]
    assert quarot[0]["fidelity/sqnr/all/e2e"] != quarot[1]["fidelity/sqnr/all/e2e"]  # other signs, other result
    table = paper_table(results)
    row = table.frame[table.frame["method"] == "quarot"]
    assert list(row["n"]) == [2]  # the two seeds are one row, not quarot and quarot(seed=1)
    assert table.varied == ("method.seed", "seed")
    assert "they differ in method.seed, seed" in format_paper_markdown(table)


def test_seed_keys_outside_the_randomness_sources_are_refused(cli, tmp_path):
    code, out = cli("-m", *TINY, f"paths.output_root={tmp_path}/o", "method=rtn", "quant=w4a8",
                    "hydra.sweeper.seeds=[0,1]", "hydra.sweeper.seed_keys=[seed,quant.w_bits]",
                    f"hydra.sweep.dir={tmp_path}/sw")
    assert code != 0 and "seed_keys" in out and "quant.w_bits" in out and "calib.seed" in out
