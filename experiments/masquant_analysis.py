"""MASQuant analysis on one model and scheme: the figures a researcher checks before a benchmark.

    .venv/bin/python experiments/masquant_analysis.py                       # testbed, W4A8
    .venv/bin/python experiments/masquant_analysis.py quant=w4a6 --layer 12 --out outputs/analysis

1. Per-layer SQNR per modality vs FP for dense and the jobs of ``conf/experiment/variants_testbed.yaml`` but
   SmoothQuant (RTN, uniform smoothing, MAS with per-modality weights, MAS+CMC): ``sqnr_<modality>.csv`` + a
   table. Each variant is an ordinary run (cached by config hash, so re-running is cheap).
2. Per-channel activation max |x| per modality at one layer's q/k/v input (paper Fig. 2 kind):
   ``channel_absmax_layer<L>.png``.
3. Effective rank of ΔW_vision for that layer's q_proj, plain vs whitened, and the relative output
   error of rank-r plain vs whitened SVD: ``delta_w_rank_layer<L>.json``.
Any Hydra override of the main app applies to every variant.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pandas as pd  # noqa: E402
import torch  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from masquant.app import pipeline  # noqa: E402
from masquant.engine.walker import capture_stack_inputs  # noqa: E402
from masquant.evaluation.metrics import SQNR_KEY  # noqa: E402
from masquant.adapters import get_adapter  # noqa: E402
from masquant.app.config import register_configs  # noqa: E402
from masquant.methods.masquant.analysis import (  # noqa: E402
    channel_absmax,
    delta_w_rank_report,
    layer_input_rows,
)
from masquant.sources import calibration_sets  # noqa: E402
from masquant.reporting.plots import plot_channel_absmax  # noqa: E402
from masquant.quant.smoothing import smooth_factors, weight_input_absmax  # noqa: E402
from masquant.reporting.plots import run_label  # noqa: E402
from masquant.reporting.table import format_markdown  # noqa: E402
from masquant.app.main import CONF_DIR, run_with_reference  # noqa: E402
from masquant.sweep.sweeper import configured_jobs  # noqa: E402

EXPERIMENT = "experiment=variants_testbed"


def variant_metrics(overrides: list[str]) -> dict[str, dict]:
    """Each variant's result (run or reused), keyed by its method label and bits; "dense" the reference."""
    results = {}
    base = compose(config_name="config", overrides=[EXPERIMENT, *overrides], return_hydra_config=True)
    for job in configured_jobs(base, overrides):
        if "method=smoothquant" in job:
            continue
        cfg = compose(config_name="config", overrides=[EXPERIMENT, *job, "eval=fidelity"])
        *ref, metrics = run_with_reference(cfg)
        results[run_label(metrics)] = metrics
        if ref:
            results.setdefault("dense", ref[0])
    return results


def sqnr_frames(results: dict[str, dict]) -> dict[str, pd.DataFrame]:
    frames = {}
    for variant, metrics in results.items():
        for key, value in metrics.items():
            m = SQNR_KEY.match(key)
            if m:
                layer = "e2e" if m["layer"] is None else int(m["layer"])
                frames.setdefault(m["modality"], {}).setdefault(variant, {})[layer] = value
    return {mod: pd.DataFrame(cols) for mod, cols in frames.items()}


@torch.no_grad()
def activation_figures(overrides: list[str], layer_idx: int, out: Path) -> dict:
    cfg = compose(config_name="config", overrides=[*overrides, "method=dense", "quant=fp16"])
    spec = pipeline.resolve(cfg)
    model, processor = pipeline.load_model(spec)
    adapter = get_adapter(model)
    calib, _, _ = calibration_sets(cfg, processor, adapter)
    captured = capture_stack_inputs(model, adapter.decoder_stack(spec.video_as), calib.batches, spec.device)
    absmax = channel_absmax(adapter, layer_idx, captured, spec.device, "qkv")
    png = plot_channel_absmax(absmax, out / f"channel_absmax_layer{layer_idx}.png",
                              f"{cfg.model.name}: layer {layer_idx} q/k/v input, per-channel max|x| by modality")
    # ΔW_vision of q_proj at the MAS initialisation, with the layer's FP vision activations
    rows = layer_input_rows(adapter, layer_idx, captured, spec.device, "qkv")
    X_v, X_t = rows["vision"], rows["text"]
    layer = adapter.decoder_layers()[layer_idx]
    W = adapter.linears(layer)["q"].weight.float().cpu()
    w_absmax = weight_input_absmax(W)
    s_t = smooth_factors(X_t.abs().amax(0), w_absmax, 0.5)
    s_v = smooth_factors(X_v.abs().amax(0), w_absmax, 0.5)
    full = min(W.shape)
    ranks = sorted({max(1, full // 20), full // 5, full // 2})
    report = delta_w_rank_report(W, s_t, s_v, X_v, spec.scheme if not spec.scheme.is_dense else
                                 pipeline.scheme_from_cfg(compose(config_name="config", overrides=overrides).quant),
                                 ranks=ranks)
    report.update({"layer": layer_idx, "linear": "q", "vision_tokens": int(X_v.shape[0])})
    (out / f"delta_w_rank_layer{layer_idx}.json").write_text(json.dumps(report, indent=2))
    return {"png": str(png), **report}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer", type=int, default=None, help="layer for the figures (default: the middle one)")
    parser.add_argument("--out", default="outputs/analysis")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        base = compose(config_name="config", overrides=args.overrides)
        out = Path(args.out) / f"{base.model.name}-{base.quant.name}"
        out.mkdir(parents=True, exist_ok=True)
        results = variant_metrics(args.overrides)
        for modality, df in sqnr_frames(results).items():
            df.to_csv(out / f"sqnr_{modality}.csv", index_label="layer")
            print(f"\nSQNR (dB) vs FP, {modality} tokens, {base.model.name} {base.quant.name}\n")
            print(format_markdown(df.reset_index(names="layer")))
        rtn = next(m for name, m in results.items() if name.startswith("rtn"))
        n_layers = sum(1 for k in rtn if k.startswith("fidelity/sqnr/all/layer_")) + 1
        layer = args.layer if args.layer is not None else n_layers // 2
        fig = activation_figures(args.overrides, layer, out)
    print(f"\nΔW_vision rank report (layer {layer} q_proj): " + json.dumps({k: v for k, v in fig.items() if k != 'png'}))
    print(f"figure: {fig['png']}\noutputs: {out}")


if __name__ == "__main__":
    main()
