"""testbed-omni on this machine: the audio projector's training time, then the tri-modal default run's stages.

    .venv/bin/python benchmarks/testbed_omni.py                       # training (into a temporary file) + the run
    .venv/bin/python benchmarks/testbed_omni.py --skip-training       # only the run's stage table
    .venv/bin/python benchmarks/testbed_omni.py --e2e-minutes 2 method=rtn   # a shorter training, another run

The training is `scripts/train_testbed_omni.py` (its phases: ridge alignment, end-to-end steps); the run is
`python -m masquant model=testbed_omni modality=text_vision_audio method=masquant quant=w4a8` plus any overrides,
timed per stage with peak memory by `benchmarks/stages.py` (forced, in a temporary output folder).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
RUN = ["model=testbed_omni", "modality=text_vision_audio", "method=masquant", "quant=w4a8"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--e2e-minutes", type=float, default=None, help="training budget (default: the script's)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides of the run")
    args = parser.parse_args()
    if not args.skip_training:
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, str(ROOT / "scripts" / "train_testbed_omni.py"), "--out", f"{tmp}/audio.safetensors"]
            if args.e2e_minutes is not None:
                cmd += ["--e2e-minutes", str(args.e2e_minutes)]
            t0 = time.perf_counter()
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            wall = time.perf_counter() - t0
        report = json.loads(out[out.index("{"):])
        print("\naudio projector training (scripts/train_testbed_omni.py)\n")
        print("| phase | seconds |\n|---|---|")
        for key in ("align/seconds", "e2e/seconds", "train/seconds", "eval/seconds"):
            print(f"| {key.split('/')[0]} | {report[key]:.0f} |")
        print(f"| process wall (load + train + check) | {wall:.0f} |")
        print(f"\nsteps {report['e2e/steps']}, loss {report['e2e/loss_first10']:.2f} -> {report['e2e/loss_last10']:.2f}; "
              f"held-out WER {report['eval/wer']:.1f}, OmniBench-style {report['eval/omnibench_acc']:.0f}%")
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "stages.py"), *RUN, *args.overrides], check=True)


if __name__ == "__main__":
    main()
