"""Sweeps: Hydra multirun end to end (sequential jobs), resume by skipping finished jobs; GPU pool expansion."""

import json
import os
import subprocess
import sys
from pathlib import Path

from experiments.gpu_pool import expand

ROOT = Path(__file__).resolve().parents[2]


def _sweep(tmp_path):
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "MASQUANT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "masquant", "-m", "debug=default", "hydra.verbose=false", "method=rtn",
           "quant=w8a8,w4a8", f"paths.output_root={tmp_path}/out", "eval.ppl=false", f"hydra.sweep.dir={tmp_path}/sw"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_multirun_sweep_runs_each_job_once_writes_one_table_and_resumes(tmp_path):
    first = _sweep(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    runs = sorted(p.parent.relative_to(tmp_path / "out" / "runs").as_posix()
                  for p in (tmp_path / "out" / "runs").rglob("metrics.json"))
    # one dense reference shared by both jobs, one result per quant scheme
    assert [r.rsplit("-", 1)[0] for r in runs] == [
        "tiny-qwen2.5-vl/dense/fp16", "tiny-qwen2.5-vl/rtn/w4a8", "tiny-qwen2.5-vl/rtn/w8a8"]
    assert "| rtn | W8A8 |" in first.stdout and "| rtn | W4A8 |" in first.stdout
    # one table of the whole sweep: the reference and both jobs, each once, with their values
    table = (tmp_path / "sw" / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| tiny-qwen2.5-vl |")]
    assert [r.split(" | ")[1:3] for r in rows] == [["dense", "FP16"], ["rtn", "W4A8"], ["rtn", "W8A8"]]
    w8a8 = json.loads(next((tmp_path / "out" / "runs").rglob("w8a8-*/metrics.json")).read_text())
    assert f"| {w8a8['fidelity/sqnr/text/e2e']:.2f} |" in rows[2]
    record = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert len(record["jobs"]) == 2 and len(record["run_dirs"]) == 3 and not record["failed"]
    assert sorted(p.name for p in (tmp_path / "sw" / "plots").glob("layer_sqnr_*.png")) == [
        "layer_sqnr_all.png", "layer_sqnr_text.png", "layer_sqnr_vision.png"]
    second = _sweep(tmp_path)
    assert second.returncode == 0
    assert second.stderr.count("skipping") + second.stdout.count("skipping") >= 3


def test_gpu_pool_expands_cartesian_product():
    jobs = expand(["method=rtn,masquant", "quant=w4a8,w4a6", "eval.tasks=[a,b]"])
    assert len(jobs) == 4
    assert ["method=masquant", "quant=w4a6", "eval.tasks=[a,b]"] in jobs


def _glob(root, pattern):
    """``root.rglob(pattern)`` while another process renames and removes folders under it (a scan that meets a folder
    which has just gone is retried)."""
    for _ in range(100):
        try:
            return list(root.rglob(pattern)) if root.exists() else []
        except FileNotFoundError:
            continue
    return []


def _kill_when(cmd, env, ready, timeout=120.0):
    """Start the sweep, SIGKILL it as soon as ``ready()`` holds; True if it was still running then."""
    import signal
    import time

    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while proc.poll() is None and not ready() and time.monotonic() - t0 < timeout:
        time.sleep(0.02)
    alive = proc.poll() is None
    if alive:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return alive


def test_sweep_killed_at_three_points_resumes_with_each_result_once(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "MASQUANT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "masquant", "-m", "debug=default", "hydra.verbose=false", "method=rtn",
           "quant=w8a8,w4a8,w4a4", f"paths.output_root={out}", f"hydra.sweep.dir={tmp_path}/sweep"]

    def results():
        return _glob(out, "metrics.json")

    def partials():
        return _glob(out, ".*.partial-*")

    points = [
        lambda: bool(partials()),                            # inside the first run (the dense reference)
        lambda: len(results()) >= 1 and bool(partials()),    # inside the first job, reference done
        lambda: len(results()) >= 3,                         # between or inside the last jobs
    ]
    killed = [_kill_when(cmd, env, p) for p in points]
    assert killed == [True, True, True], f"kill points reached while the sweep ran: {killed}"
    final = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    runs = [p.parent.relative_to(out / "runs").as_posix().rsplit("-", 1)[0] for p in results()]
    assert sorted(runs) == ["tiny-qwen2.5-vl/dense/fp16", "tiny-qwen2.5-vl/rtn/w4a4", "tiny-qwen2.5-vl/rtn/w4a8",
                            "tiny-qwen2.5-vl/rtn/w8a8"]
    stale = [p for p in (out / "runs").rglob(".*") if p.is_dir()]
    assert stale == [], stale
