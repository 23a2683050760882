"""Provenance in every result, the results format in the config hash, and the stale-result report."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch

from masquant.app import pipeline
from masquant.runs.provenance import UNKNOWN, git_state, package_versions, stale_reasons
from masquant.reporting.cli import main as report_main
from masquant.runs import hashing
from masquant.runs.store import RESULTS_FORMAT

TINY = ["model=tiny_qwen25vl", "calib=tiny", "eval=fidelity", "calib.n_samples=2", "calib.held_out=1"]


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_git_state_outside_a_checkout_is_unknown(tmp_path):
    assert git_state(tmp_path) == {"commit": UNKNOWN, "dirty": UNKNOWN}


def test_git_state_gives_the_commit_and_the_dirty_flag(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    assert git_state(tmp_path) == {"commit": _git(tmp_path, "rev-parse", "HEAD"), "dirty": False}
    (tmp_path / "untracked.txt").write_text("not code")  # untracked files do not make the tree dirty
    assert git_state(tmp_path)["dirty"] is False
    (tmp_path / "a.py").write_text("x = 2\n")
    assert git_state(tmp_path)["dirty"] is True


def test_stale_reasons():
    current = {"provenance/git_commit": "a" * 40, "provenance/format": RESULTS_FORMAT}
    assert stale_reasons(current, "a" * 40) == []
    assert stale_reasons({**current, "provenance/git_commit": "b" * 40}, "a" * 40) == [
        f"commit {'b' * 12} (now {'a' * 12})"]
    assert stale_reasons({**current, "provenance/format": RESULTS_FORMAT - 1}, "a" * 40) == [
        f"results format {RESULTS_FORMAT - 1} (now {RESULTS_FORMAT})"]
    assert stale_reasons({**current, "provenance/git_commit": UNKNOWN}, "a" * 40)[0].startswith("commit unknown")
    assert stale_reasons({"run/model": "m"}, "a" * 40) == ["no provenance (made before provenance was recorded)"]


def test_results_format_is_part_of_the_config_hash(compose_cfg, monkeypatch):
    cfg = compose_cfg(*TINY, "method=rtn")
    before = pipeline.config_hash(cfg)
    monkeypatch.setattr(hashing, "RESULTS_FORMAT", RESULTS_FORMAT + 1)
    after = pipeline.config_hash(cfg)
    assert before != after  # a bumped format makes every earlier result another configuration: it is re-run
    assert pipeline.resolve(cfg).run_dir.name.endswith(after)
    assert pipeline.config_hash(compose_cfg(*TINY, "method=rtn", "sweep.objective=fidelity/ppl")) == after


def test_every_result_records_its_provenance(compose_cfg):
    metrics = pipeline.run(compose_cfg(*TINY, "method=rtn", "quant=w8a8", "reference=false", "seed=3", "threads=1"))
    git = git_state()
    # the settings that decide bit-for-bit reproduction, as the run had them (threads=1 set by the run)
    assert metrics["provenance/numerics/threads"] == 1
    assert metrics["provenance/numerics/deterministic_algorithms"] == torch.are_deterministic_algorithms_enabled()
    assert metrics["provenance/numerics/float32_matmul_precision"] in ("highest", "high", "medium")
    assert metrics["provenance/numerics/cpu_capability"]
    assert metrics["provenance/git_commit"] == git["commit"] and metrics["provenance/git_dirty"] == git["dirty"]
    assert metrics["provenance/version/torch"] == torch.__version__
    assert metrics["provenance/version/transformers"] == package_versions(["transformers"])["transformers"] != UNKNOWN
    assert metrics["provenance/version/lmms_eval"] != UNKNOWN and metrics["provenance/version/masquant"] != UNKNOWN
    assert metrics["provenance/format"] == RESULTS_FORMAT
    assert metrics["provenance/device"].startswith("cpu") and metrics["provenance/host"]
    assert 0 < metrics["provenance/wall_s"] < 300
    assert metrics["run/seed"] == 3 and metrics["run/eval_limit"] is None


def test_report_stale_lists_results_of_another_commit(tmp_path, capsys):
    git = git_state()
    results = {"current": {"provenance/git_commit": git["commit"], "provenance/format": RESULTS_FORMAT},
               "old_commit": {"provenance/git_commit": "0" * 40, "provenance/format": RESULTS_FORMAT},
               "old_format": {"provenance/git_commit": git["commit"], "provenance/format": 0},
               "no_provenance": {}}
    for name, provenance in results.items():
        folder = tmp_path / "runs" / "m" / "rtn" / f"w4a8-{name}"
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({"run/model": "m", **provenance}))
    assert report_main(["--stale", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith(f"3 of 4 results under {tmp_path / 'runs'} are stale")
    assert sorted(line.split(":")[0].rsplit("-", 1)[1] for line in lines[1:]) == [
        "no_provenance", "old_commit", "old_format"]
    assert f"commit {'0' * 12} (now {str(git['commit'])[:12]})" in out and "results format 0" in out


@pytest.mark.parametrize("root", ["nowhere"])
def test_report_stale_on_a_missing_folder(tmp_path, capsys, root):
    assert report_main(["--stale", str(tmp_path / root)]) == 2


def test_config_hashes_survive_upgrades(compose_cfg):
    """Results are found by config hash: a change that moves the hash of an unchanged configuration orphans every
    finished result of every user (their sweeps silently re-run). These are the hashes of the default testbed
    runs as first written; an option added with a behaviour-preserving default must keep them (list it in
    masquant.runs.hashing.ADDED_WITH_NEUTRAL_DEFAULT), and a deliberate change bumps RESULTS_FORMAT and these values."""
    t1 = ["experiment=table1_testbed", "method=dense", "quant=fp16"]
    # moved once on purpose: the experiment now scores 100 documents per task with per-task answer caps and
    # batch 16 (977c5ff864 before): another configuration, whose earlier results are rightly not reused
    assert pipeline.config_hash(compose_cfg(*t1)) == "6ec0a8ecbf"
    assert pipeline.config_hash(compose_cfg(*t1, "eval.max_new_tokens_cap=8")) != "6ec0a8ecbf"  # another config  # a non-default value is another configuration


def test_neutral_defaults_leave_the_statistics_cache_key_alone():
    from masquant.runs.hashing import without_neutral_defaults

    calib = {"name": "testbed", "n_samples": 16, "with_answers": False}
    assert without_neutral_defaults("calib", calib) == {"name": "testbed", "n_samples": 16}
    assert without_neutral_defaults("calib", {**calib, "with_answers": True})["with_answers"] is True
    assert without_neutral_defaults("eval", {"max_new_tokens_cap": None, "limit": None}) == {"limit": None}
