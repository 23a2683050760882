"""Time each stage of a run and record peak memory; prints a table.

    .venv/bin/python benchmarks/stages.py                      # the default run (testbed, rtn, w4a8)
    .venv/bin/python benchmarks/stages.py method=masquant quant=w4a8 eval=fidelity

Any Hydra override of the main app works. Runs with force=true into a temporary output folder
(statistics caches stay where paths.cache_dir says, so a second call measures the cached path).
Prints each stage's wall and CPU seconds (CPU: all threads of the process, the figure to compare on a shared
machine), the whole command's wall and CPU time, the load average and the thread count.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hydra import compose, initialize_config_dir  # noqa: E402

from masquant.app.config import register_configs  # noqa: E402
from masquant.app.main import CONF_DIR, run_with_reference  # noqa: E402

STAGES = ("load", "calib_data", "reference", "quantize", "fidelity", "eval")


def main(overrides: list[str]) -> None:
    import torch

    wall0 = time.perf_counter()
    register_configs()
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"paths.output_root={tmp}", "force=true", *overrides])
        rows = run_with_reference(cfg)
    wall, usage = time.perf_counter() - wall0, os.times()
    load = os.getloadavg()
    print(f"\nstage timings, wall s / CPU s ({' '.join(overrides) or 'default run'}; device {rows[-1]['run/device']}; "
          f"torch threads {torch.get_num_threads()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f})\n")
    print("| run | " + " | ".join(STAGES) + " | total s | peak MB |")
    print("|---|" + "---|" * (len(STAGES) + 2))
    for m in rows:
        times = [m.get(f"time/{s}_s", 0.0) for s in STAGES]
        cpus = [m.get(f"time/{s}_cpu_s", 0.0) for s in STAGES]
        cells = " | ".join(f"{t:.1f} / {c:.1f}" for t, c in zip(times, cpus))
        print(f"| {m['run/method']} {m['run/bits']} | {cells} | {sum(times):.1f} / {sum(cpus):.1f} | "
              f"{m['memory/peak_mb']:.0f} |")
    print(f"\nboth runs with their set-up (after the imports): wall {wall:.1f} s, CPU "
          f"{usage.user + usage.system:.1f} s")
    print("\npeak memory (MB) after each stage of the last run: "
          + ", ".join(f"{s} {rows[-1].get(f'memory/peak_after_{s}_mb', 0):.0f}" for s in STAGES))


if __name__ == "__main__":
    main(sys.argv[1:])
