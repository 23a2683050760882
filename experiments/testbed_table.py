"""The MASQuant testbed table: dense, RTN, SmoothQuant, uniform smoothing, MAS, MAS+CMC at each scheme.

    .venv/bin/python experiments/testbed_table.py                         # W8A8, W4A8, W4A6, benchmarks + SQNR
    .venv/bin/python experiments/testbed_table.py --quants w4a8 eval=fidelity

Every cell is an ordinary run (results keyed by config hash: re-running resumes). Prints the table
and writes it as CSV next to the runs (<output_root>/tables/testbed_table.csv).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hydra import compose, initialize_config_dir  # noqa: E402

from masquant.config import register_configs  # noqa: E402
from masquant.reporting.table import format_markdown, results_frame  # noqa: E402
from masquant.run import CONF_DIR, run_with_reference  # noqa: E402

# The testbed's smoothing factors are small (phase-2 tower: median s_text 0.82, s_vision 0.56; 1% quantile 0.28 / 0.16)
# and AdamW moves each one by about lr per step whatever its size, so the paper's lr 5e-2 (tuned for 7B
# models) drives many testbed vision scales through zero to the ±1e-2 floor; under CMC a vision token then
# sees its activation-quantization noise amplified by s_text/s_vision (up to 186x measured at layer 18).
# The testbed experiments use lr 5e-3 (see README, MASQuant section).
TESTBED_LR = ["method.lr=0.005"]
VARIANTS = {
    "rtn": ["method=rtn"],
    "smoothquant": ["method=smoothquant"],
    "uniform": ["method=masquant", "method.uniform=true", "method.learn=false", "method.deploy=per_modality_weights"],
    "mas": ["method=masquant", "method.deploy=per_modality_weights", *TESTBED_LR],
    "mas+cmc": ["method=masquant", *TESTBED_LR],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quants", default="w8a8,w4a8,w4a6")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    register_configs()
    rows = []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for q in args.quants.split(","):
            for name in args.variants.split(","):
                cfg = compose(config_name="config", overrides=[*args.overrides, *VARIANTS[name], f"quant={q}"])
                *ref, metrics = run_with_reference(cfg)
                if not rows:
                    rows += ref
                rows.append({**metrics, "run/method_label": name})
        out = Path(cfg.paths.output_root) / "tables"
    df = results_frame(rows)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "testbed_table.csv", index=False, float_format="%.2f")
    print("\n" + format_markdown(df) + f"\n\nCSV: {out / 'testbed_table.csv'}")


if __name__ == "__main__":
    main()
