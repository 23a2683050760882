"""Run a sweep on the GPUs of one node, one job per GPU at a time (no cluster scheduler needed).

    python experiments/gpu_pool.py --gpus 0,1,2,3,4,5,6,7 -- model=qwen25vl_7b model.path=/models/Qwen2.5-VL-7B \\
        method=rtn,smoothquant,masquant quant=w8a8,w4a8,w4a6

Comma lists in the overrides expand to their cartesian product (like Hydra's -m). Each job is
``python -m masquant <overrides> device=cuda`` with its own CUDA_VISIBLE_DEVICES, so GPU memory is
freed between jobs. Finished jobs skip themselves (results are keyed by config hash), so re-running
the same command resumes an interrupted sweep. Logs: <log-dir>/<job>.log.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path


def expand(overrides: list[str]) -> list[list[str]]:
    """['a=1,2', 'b=x'] -> [['a=1', 'b=x'], ['a=2', 'b=x']] (values inside [...] are not split)."""
    axes = []
    for o in overrides:
        key, _, value = o.partition("=")
        values = [value] if value.startswith("[") else value.split(",")
        axes.append([f"{key}={v}" for v in values])
    return [list(combo) for combo in itertools.product(*axes)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", required=True, help="comma-separated GPU ids, e.g. 0,1,2,3")
    parser.add_argument("--log-dir", default="outputs/gpu_pool")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs and exit")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    jobs = expand(args.overrides)
    if args.dry_run:
        for j in jobs:
            print(" ".join(j))
        return 0
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    todo: queue.Queue = queue.Queue()
    for i, job in enumerate(jobs):
        todo.put((i, job))
    failures = []

    def worker(gpu: str) -> None:
        while True:
            try:
                i, job = todo.get_nowait()
            except queue.Empty:
                return
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": gpu}
            with open(log_dir / f"job{i:03d}.log", "w") as log:
                rc = subprocess.call([sys.executable, "-m", "masquant", *job, "device=cuda"], env=env, stdout=log,
                                     stderr=subprocess.STDOUT)
            print(f"[gpu {gpu}] job {i} {'ok' if rc == 0 else f'FAILED rc={rc}'}: {' '.join(job)}", flush=True)
            if rc != 0:
                failures.append((i, job))

    threads = [threading.Thread(target=worker, args=(g,)) for g in args.gpus.split(",")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"{len(jobs) - len(failures)}/{len(jobs)} jobs finished; results: python -m masquant.reporting")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
