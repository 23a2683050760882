"""Documents per second of the benchmark stage, dense vs quantized, at several generation batch sizes.

    .venv/bin/python benchmarks/eval_speed.py                                  # testbed, dense and RTN W4A8
    .venv/bin/python benchmarks/eval_speed.py --batch-sizes 1,4,16 --docs 40 quant=w4a6

Each cell is one run of the main app (force=true, a temporary output folder) with the benchmarks alone
(no fidelity, no perplexity); the figure is documents over the eval stage's CPU time (all threads of the
process: the number to compare on a shared machine) and over its wall time. Prints the load average and
the thread count beside the table.
"""

from __future__ import annotations

import argparse
import os
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from masquant.app import pipeline  # noqa: E402
from masquant.app.config import register_configs  # noqa: E402
from masquant.app.main import CONF_DIR  # noqa: E402

RUNS = {"dense": ["method=dense", "quant=fp16"], "rtn": ["method=rtn"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="4,16")
    parser.add_argument("--docs", type=int, default=20, help="documents per task (eval.testbed_docs)")
    parser.add_argument("--quant", default="w4a8", help="the quantized row's scheme")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    register_configs()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            for name, run in RUNS.items():
                quant = [] if name == "dense" else [f"quant={args.quant}"]
                cfg = compose(config_name="config", overrides=[
                    f"paths.output_root={tmp}", "force=true", "reference=false", "logger=none",
                    "eval.fidelity=false", "eval.ppl=false", f"eval.testbed_docs={args.docs}",
                    f"eval.batch_size={bs}", *run, *quant, *args.overrides])
                m = pipeline.run(cfg)
                n = args.docs * len(cfg.eval.tasks)
                rows.append((m["run/method"], m["run/bits"], bs, n, m["time/eval_cpu_s"], m["time/eval_s"]))
    load = os.getloadavg()
    print(f"\neval speed (load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; torch threads "
          f"{torch.get_num_threads()}; {' '.join(args.overrides) or 'testbed'})\n")
    print("| run | batch | documents | eval CPU s | eval wall s | docs / CPU s | docs / wall s |")
    print("|---|---|---|---|---|---|---|")
    for method, bits, bs, n, cpu, wall in rows:
        print(f"| {method} {bits} | {bs} | {n} | {cpu:.1f} | {wall:.1f} | {n / cpu:.2f} | {n / wall:.2f} |")


if __name__ == "__main__":
    main()
