"""The rotation-family testbed table: dense, RTN, GPTQ, QuaRot (RTN / GPTQ weights), MQuant's ablation steps.

QuaRot and MQuant run their official recipes (``recipe=official``: conf/recipes/quarot-official.yaml and
mquant-official.yaml, GPTQ true-sequential with the MSE clip, QuaRot's full o_proj rotation, MQuant's act-order and
its scales from the weight-quantized model while it generates); "QuaRot, RTN weights" is the official --w_rtn
(the MSE clip kept). Rows marked "(ours)" are the project's defaults, reported beside them.

    .venv/bin/python experiments/rotation_table.py                      # W4A8 and W4A4, eval=fidelity
    .venv/bin/python experiments/rotation_table.py --quants w4a8 --variants rtn,quarot-gptq

Every cell is an ordinary CLI run in its own process (``python -m masquant ...``: its peak memory is its own;
results keyed by config hash: re-running resumes). MQuant runs with static
per-tensor activations (quant.a_dynamic=false quant.a_granularity=tensor) and GPTQ weights, its paper's
setting; the others with the scheme's dynamic per-token activations. Prints the table (e2e SQNR per
modality, perplexity, quantize stage time, peak memory, GPTQ time per layer) and writes it as CSV next to the
runs (<output_root>/tables/rotation_table.csv).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hydra import compose, initialize_config_dir  # noqa: E402

from masquant.app.config import register_configs  # noqa: E402
from masquant.reporting.table import add_paired_tests, format_markdown, results_frame  # noqa: E402
from masquant.app.main import CONF_DIR  # noqa: E402

GPTQ = ["quant.w_quantizer=gptq"]
OFFICIAL = ["recipe=official"]
STATIC = ["quant.a_dynamic=false", "quant.a_granularity=tensor", *GPTQ]
VARIANTS = {
    "rtn": ["method=rtn"],
    "gptq": ["method=rtn", *GPTQ],
    "quarot-rtn": ["method=quarot", *OFFICIAL, "quant.w_quantizer=rtn"],  # official --w_rtn --w_clip
    "quarot-gptq": ["method=quarot", *OFFICIAL],
    "quarot-rtn (ours)": ["method=quarot"],  # the scheme's plain RTN weights, no clip search
    "mquant static gptq+hadamard": ["method=mquant", *OFFICIAL, "method.msq=false", "method.aifs=false",
                                    "method.rms=false"],
    "mquant +msq+aifs": ["method=mquant", *OFFICIAL, "method.rms=false"],
    "mquant +msq+aifs+rms": ["method=mquant", *OFFICIAL],
    "mquant +msq+aifs+rms FP-prompt scales (ours)": ["method=mquant", *STATIC],  # the method's defaults
}


# each row's paired test is against this row (same bits): the baselines against RTN, each MQuant step the one before
COMPARED_WITH = {
    "gptq": "rtn", "quarot-rtn": "rtn", "quarot-gptq": "rtn", "quarot-rtn (ours)": "quarot-rtn",
    "mquant static gptq+hadamard": "rtn", "mquant +msq+aifs+rms FP-prompt scales (ours)": "mquant +msq+aifs+rms",
    "mquant +msq+aifs": "mquant static gptq+hadamard", "mquant +msq+aifs+rms": "mquant +msq+aifs",
}


def reference_rows(rows: list[dict]) -> list[int | None]:
    """For each row, the index of the row it is compared with (same bits), or None."""
    where = {(r.get("run/bits"), r.get("run/method_label")): i for i, r in enumerate(rows)}
    return [where.get((r.get("run/bits"), COMPARED_WITH.get(r.get("run/method_label")))) for r in rows]


def gptq_seconds_per_layer(m: dict) -> float | None:
    return next((v for k, v in m.items() if k.endswith("gptq_s_per_layer")), None)


def run_cell(overrides: list[str]) -> dict:
    """One configuration through the CLI in its own process (so its peak memory is its own); its metrics."""
    from masquant.app import pipeline
    from masquant.runs.store import load_result

    cfg = compose(config_name="config", overrides=overrides)
    subprocess.run([sys.executable, "-m", "masquant", *overrides], check=True)
    return load_result(pipeline.resolve(cfg).run_dir)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quants", default="w4a8,w4a4")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    register_configs()
    rows = []
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for q in args.quants.split(","):
            for name in args.variants.split(","):
                overrides = ["eval=fidelity", *args.overrides, *VARIANTS[name], f"quant={q}"]
                if not rows:
                    rows.append(run_cell([*overrides[:-len(VARIANTS[name]) - 1], "method=dense", "quant=fp16"]))
                rows.append({**run_cell(overrides), "run/method_label": name})
        out = Path(compose(config_name="config", overrides=args.overrides).paths.output_root) / "tables"
    df = add_paired_tests(results_frame(rows), rows, reference_rows(rows))
    df["quantize s"] = [m.get("time/quantize_s") for m in rows]
    df["peak MB"] = [m.get("memory/peak_mb") for m in rows]
    df["GPTQ s/layer"] = [gptq_seconds_per_layer(m) for m in rows]
    df = df.drop(columns=[c for c in ("calib", "limit") if c in df.columns])
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "rotation_table.csv", index=False, float_format="%.2f")
    legend = ("task cells: score ± the half-width of its 95 % interval over the documents; *: differs at 5 % from its "
              "reference row on the same documents (paired: exact McNemar; the baselines against RTN, each MQuant "
              "step against the one before)")
    print("\n" + format_markdown(df) + f"\n\n{legend}\n\nCSV: {out / 'rotation_table.csv'}")


if __name__ == "__main__":
    main()
