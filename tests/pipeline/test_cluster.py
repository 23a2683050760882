"""SLURM through hydra-submitit-launcher (hydra/launcher=slurm) on a fake cluster: tests/support/fake_slurm holds an
``sbatch`` that keeps the submission script and (unless FAKE_SLURM_DRY_RUN=1) runs the array's tasks on this machine
with the SLURM_* variables set, an ``srun`` that runs its command, and an ``sacct`` that knows no job.

What this proves: the launcher config composes; submitit turns its fields into the sbatch options (GPUs, time,
partition, array size and parallelism) of the script it would submit; every job is validated before anything is
submitted; and (slow test) each pickled job (config, task function, Hydra's state) runs on a "node" through
``python -m submitit.core._submit`` and returns to the sweeper, which writes the sweep's table from the shared output
root. What it cannot prove: that a real SLURM accepts the script and grants the GPUs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support.cli import cli, loads  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parents[2]
FAKE_SLURM = Path(__file__).resolve().parents[1] / "support" / "fake_slurm"
TINY = ["model=tiny_qwen25vl", "calib=tiny", "eval=fidelity", "calib.n_samples=2", "calib.held_out=1", "eval.ppl=false"]
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=debugq", "hydra.launcher.timeout_min=30",
            "hydra.launcher.gpus_per_node=2"]


def test_slurm_launcher_config_composes(compose_cfg):
    cfg = compose_cfg(*LAUNCHER, "+hydra.launcher.additional_parameters.mail-type=END", return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node) == ("debugq", 30, 2)
    assert launcher.additional_parameters == {"mail-type": "END"} and launcher.tasks_per_node == 1


def _sbatch_options(script: str) -> dict[str, str]:
    lines = [line[len("#SBATCH --"):] for line in script.splitlines() if line.startswith("#SBATCH --")]
    return dict(line.split("=", 1) for line in lines)


def test_slurm_dry_run_writes_the_submission_and_runs_nothing(cli, loads, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path))
    monkeypatch.setenv("FAKE_SLURM_DRY_RUN", "1")
    code, out = cli("-m", *LAUNCHER, *TINY, "method=rtn,smoothquant", "quant=w8a8,w4a8",
                    f"paths.output_root={tmp_path}/o", f"hydra.sweep.dir={tmp_path}/sw")
    assert code != 0 and "dry run" in out and loads == []
    script = (tmp_path / "submission.sh").read_text()
    options = _sbatch_options(script)
    assert options["gpus-per-node"] == "2" and options["time"] == "30" and options["partition"] == "debugq"
    assert options["array"] == "0-3%4" and options["ntasks-per-node"] == "1" and options["mem"] == "64GB"
    assert f"{sys.executable} -u -m submitit.core._submit {tmp_path}/sw/.submitit/%j" in script
    assert not (tmp_path / "o" / "runs").exists()


def test_a_bad_job_fails_before_anything_is_submitted(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM_DIR", str(tmp_path))
    code, out = cli("-m", *LAUNCHER, *TINY, "method=rtn,smoothquant", "quant=w4a16_g128",
                    f"paths.output_root={tmp_path}/o", f"hydra.sweep.dir={tmp_path}/sw")
    assert code != 0 and "1 of 2 sweep jobs have configuration errors" in out
    assert not (tmp_path / "submission.sh").exists()


@pytest.mark.slow
def test_slurm_array_runs_through_submitit_on_a_fake_cluster(tmp_path):
    env = {**os.environ, "PATH": f"{FAKE_SLURM}{os.pathsep}{os.environ['PATH']}", "FAKE_SLURM_DIR": str(tmp_path),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "masquant", "-m", *LAUNCHER, *TINY, "method=rtn", "quant=w8a8,w4a8",
           f"paths.output_root={tmp_path}/o", f"paths.cache_dir={tmp_path}/c", f"hydra.sweep.dir={tmp_path}/sw"]
    run = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    assert _sbatch_options((tmp_path / "submission.sh").read_text())["array"] == "0-1%2"
    for task in (0, 1):
        assert "Job completed successfully" in (tmp_path / f"task_{task}.log").read_text()
    finished = sorted(p.parent.parent.name + "/" + p.parent.name.split("-")[0]
                      for p in (tmp_path / "o" / "runs").rglob("metrics.json"))
    assert finished == ["dense/fp16", "rtn/w4a8", "rtn/w8a8"]
    table = (tmp_path / "sw" / "table.md").read_text()
    assert "| rtn | W4A8 |" in table and "| rtn | W8A8 |" in table
