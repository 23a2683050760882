"""Train the testbed-omni audio projector and write it to masquant/testbed/weights/testbed_omni_audio.safetensors.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/train_testbed_omni.py            # the committed weights
    .venv/bin/python scripts/train_testbed_omni.py --eval-only                        # WER / OmniBench of the weights

Prints the phase times and a quick held-out evaluation (WER and OmniBench-style accuracy on the "eval" split).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch


def main() -> None:
    from safetensors.torch import save_file

    from masquant.testbed.omni import AUDIO_WEIGHTS_PATH, load_testbed_omni
    from masquant.testbed.train_omni import (
        OmniTrainConfig,
        audio_state,
        fit_projector_,
        quick_eval,
        train_projector_e2e_,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", default=os.environ.get("MASQUANT_CACHE", str(Path.home() / ".cache" / "masquant")))
    parser.add_argument("--out", default=str(AUDIO_WEIGHTS_PATH))
    parser.add_argument("--align-docs", type=int, default=OmniTrainConfig.align_docs)
    parser.add_argument("--e2e-minutes", type=float, default=OmniTrainConfig.e2e_minutes)
    parser.add_argument("--e2e-max-steps", type=int, default=OmniTrainConfig.e2e_max_steps)
    parser.add_argument("--lr", type=float, default=OmniTrainConfig.lr)
    parser.add_argument("--omnibench-fraction", type=float, default=OmniTrainConfig.omnibench_fraction)
    parser.add_argument("--eval-docs", type=int, default=OmniTrainConfig.eval_docs)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-only", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    config = OmniTrainConfig(align_docs=args.align_docs, e2e_minutes=args.e2e_minutes, e2e_max_steps=args.e2e_max_steps,
                             lr=args.lr, eval_docs=args.eval_docs, omnibench_fraction=args.omnibench_fraction)
    report: dict = {"config": asdict(config)}
    if args.eval_only:
        model, processor = load_testbed_omni(args.cache, audio_weights=args.out)
    else:
        model, processor = load_testbed_omni(args.cache, audio_weights=None)
        t0 = time.perf_counter()
        report.update(fit_projector_(model, processor, config))
        report.update(train_projector_e2e_(model, processor, config))
        report["train/seconds"] = time.perf_counter() - t0
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        save_file(audio_state(model), args.out)
    t0 = time.perf_counter()
    report.update(quick_eval(model, processor, config.eval_docs))
    report["eval/seconds"] = time.perf_counter() - t0
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
