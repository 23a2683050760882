"""Text perplexity benchmark: the testbed's language model alone, on the built-in WikiText-2 stand-in.

    .venv/bin/python benchmarks/text_ppl.py                        # every row below whose method is registered
    .venv/bin/python benchmarks/text_ppl.py --rows sq-w8a8,rtn-w8a8
    .venv/bin/python benchmarks/text_ppl.py --list

Corpus and perplexity: ``masquant/evaluation/text_corpus.py`` (pydoc topics, 64 calibration and 32 held-out
256-token sequences). Every row is an ordinary run (``modality=text_only calib=text eval=fidelity``,
cached by config hash under ``--output-root``), so re-running resumes. The table gives perplexity,
ΔPPL against the dense model, quantization time and peak memory, and the reference figures of a
mainstream toolkit (llm-compressor 0.14, measured on the same corpus construction on this machine kind;
2 shared cores, so times are upper bounds). Times here are as measured, on whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hydra import compose, initialize_config_dir  # noqa: E402

from masquant.app.config import register_configs  # noqa: E402
from masquant.methods.registry import method_ids  # noqa: E402
from masquant.app.main import CONF_DIR, run_with_reference  # noqa: E402

BASE = ["model=testbed_vl", "modality=text_only", "calib=text", "eval=fidelity", "eval.ppl=true"]
G64 = ["quant=w4a16_g128", "quant.w_group_size=64"]
# name -> (overrides, reference ΔPPL, reference time s) of llm-compressor 0.14 where it was measured
ROWS: dict[str, tuple[list[str], float | None, float | None]] = {
    "rtn-w8a8": (["method=rtn", "quant=w8a8"], 0.39, None),
    "sq-w8a8": (["method=smoothquant", "quant=w8a8", "method.alpha=0.8"], 0.21, 88.0),
    "rtn-w8a8-full": (["method=rtn", "quant=w8a8", "quant.int_range=full"], 0.39, None),
    "sq-w8a8-full": (["method=smoothquant", "quant=w8a8", "method.alpha=0.8", "quant.int_range=full"], 0.21, 88.0),
    "sq-w8a8-search": (["method=smoothquant", "quant=w8a8", "method.alpha_grid=[0.5,0.6,0.7,0.8,0.9]"], 0.21, 88.0),
    "rtn-w4a16-g64": (["method=rtn", *G64], 6.80, None),
    "awq-w4a16-g64": (["method=awq", *G64, "calib.n_samples=8"], 3.84, 169.0),
    "rtn-w4a16-g128": (["method=rtn", "quant=w4a16_g128"], None, None),
    "awq-w4a16-g128": (["method=awq", "quant=w4a16_g128", "calib.n_samples=8"], None, None),
    # the toolkit's grid (symmetric, codes in [-8, 7]): the like-for-like row beside its +3.84
    "awq-w4a16-g64-sym": (["method=awq", *G64, "quant.w_symmetric=true", "quant.int_range=full", "calib.n_samples=8"],
                          3.84, 169.0),
    # the opt-in bfloat16 scale search (method.search_precision=bf16; docs/methods/awq.md, "Speed")
    "awq-w4a16-g64-bf16": (["method=awq", *G64, "calib.n_samples=8", "method.search_precision=bf16"], 3.84, 169.0),
    "rtn-w4a8": (["method=rtn", "quant=w4a8"], 17.2, None),
    "sq-w4a8": (["method=smoothquant", "quant=w4a8", "method.alpha=0.8"], 17.1, None),
    "sq-w4a8-search": (["method=smoothquant", "quant=w4a8", "method.alpha_grid=[0.3,0.4,0.5,0.6,0.7,0.8,0.9]"],
                       None, None),
    "rtn-w4a8-full": (["method=rtn", "quant=w4a8", "quant.int_range=full"], None, None),
    "sq-w4a8-full-range": (["method=smoothquant", "quant=w4a8", "method.alpha=0.8", "quant.int_range=full",
                            "method.act_statistic=range"], 17.1, None),
    "masquant-text-w4a8": (["method=masquant", "quant=w4a8", "method.lr=0.005"], None, None),
    # activation sparsity alone (quant=fp16): LaRoSA and its TEAL-style ablation (Top-K without rotation)
    # (larosa-s0 checks the identity: its ΔPPL must be 0)
    **{f"{name}-s{round(100 * s)}": (["method=larosa", "quant=fp16", f"method.sparsity={s}", *extra], None, None)
       for name, extra, levels in (("larosa", [], (0, 0.25, 0.4, 0.5)), ("teal", ["method.rotate=false"], (0.25, 0.4, 0.5)))
       for s in levels},
}


def _fmt(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default=",".join(ROWS), help="comma-separated row names (see --list)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--output-root", default="outputs/text_ppl")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every row")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(f"{k}: {' '.join(v[0])}" for k, v in ROWS.items()))
        return 0
    register_configs()
    available = set(method_ids())
    table, dense = [], None
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for name in args.rows.split(","):
            if name not in ROWS:
                parser.error(f"unknown row {name!r}; valid rows: {list(ROWS)}")
            overrides, ref_delta, ref_time = ROWS[name]
            method = next(o.split("=", 1)[1] for o in overrides if o.startswith("method="))
            if method not in available:
                print(f"skipping {name}: method {method!r} is not registered here", file=sys.stderr)
                continue
            cfg = compose(config_name="config", overrides=[*BASE, f"paths.output_root={args.output_root}",
                                                             *overrides, *args.overrides])
            *ref, m = run_with_reference(cfg)
            if ref and dense is None:
                dense = ref[0]
                table.append(("dense", dense, None, None))
            table.append((name, m, ref_delta, ref_time))
    print(f"\ntext perplexity: testbed language model, pydoc corpus (dense PPL {_fmt(dense and dense['fidelity/ppl'])}; "
          "mainstream toolkit dense: 15.17)\n")
    print("| row | method | bits | PPL | ΔPPL | toolkit ΔPPL | quantize s | toolkit s | peak MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m, ref_delta, ref_time in table:
        delta = m["fidelity/ppl"] - m["fidelity/ppl_fp"]
        print(f"| {name} | {m['run/method_label']} | {m['run/bits']} | {m['fidelity/ppl']:.2f} | {delta:+.2f} | "
              f"{_fmt(ref_delta, '+.2f')} | {m.get('time/quantize_s', 0):.1f} | {_fmt(ref_time, '.0f')} | "
              f"{m.get('memory/peak_mb', 0):.0f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
