"""MASQuant's figures for one model and scheme, from the FP model and its calibration set (no quantized run):

- ``channel_absmax_layer<L>.png``: per-channel max |x| per modality at layer L's q/k/v input (paper Fig. 2 kind);
- ``cmc_rank_energy_layer<L>.png``: cumulative singular-value energy of ΔW_m of layer L's q_proj at the MAS
  initialisation (α = 0.5), plain and whitened, with the rank CMC uses (``method.cmc`` or its defaults).

The data come from :mod:`masquant.methods.masquant.analysis`, the drawing from :mod:`masquant.reporting.plots`.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

log = logging.getLogger(__name__)


@torch.no_grad()
def masquant_figures(cfg: DictConfig, out_dir: str | Path, layer: int | None = None) -> dict[str, Path]:
    """Write the figures for ``cfg``'s model, calibration set and scheme into ``out_dir``; returns their paths.

    ``layer``: the decoder layer (default: the middle one). The model is loaded once, in FP."""
    from masquant.app import pipeline
    from masquant.adapters import get_adapter
    from masquant.methods.masquant import core
    from masquant.methods.masquant.analysis import channel_absmax, delta_w_energy, layer_input_rows
    from masquant.methods.masquant.config import MASQuantConfig
    from masquant.sources import calibration_sets
    from masquant.quant.smoothing import smooth_factors, weight_input_absmax
    from masquant.reporting.plots import plot_channel_absmax, plot_rank_energy
    from masquant.app.pipeline import reference_config
    from masquant.engine.walker import capture_stack_inputs

    out_dir = Path(out_dir)
    scheme = pipeline.scheme_from_cfg(cfg.quant)
    cmc = (pipeline.resolve(cfg).method_cfg if str(cfg.method.id) == "masquant" else MASQuantConfig()).cmc
    spec = pipeline.resolve(reference_config(cfg))
    model, processor = pipeline.load_model(spec)
    adapter = get_adapter(model)
    calib, _, _ = calibration_sets(spec.cfg, processor, adapter)
    captured = capture_stack_inputs(model, adapter.decoder_stack(spec.video_as), calib.batches, spec.device)
    layer = len(adapter.decoder_layers()) // 2 if layer is None else layer
    name = f"{cfg.model.name}, layer {layer}"
    figures = {"channel_absmax": plot_channel_absmax(
        channel_absmax(adapter, layer, captured, spec.device, "qkv"), out_dir / f"channel_absmax_layer{layer}.png",
        f"{name} q/k/v input: per-channel max|x| by modality")}
    rows = layer_input_rows(adapter, layer, captured, spec.device, "qkv")
    other = next((m for m in ("vision", "audio") if m in rows and len(rows[m])), None)
    if other is None or "text" not in rows:
        log.warning("no %s tokens at layer %d: no CMC rank/energy curve", "non-text" if other is None else "text", layer)
        return figures
    W = adapter.linears(adapter.decoder_layers()[layer])["q"].weight.float().cpu()  # [out, in]
    w_absmax = weight_input_absmax(W)
    s_t = smooth_factors(rows["text"].abs().amax(0), w_absmax, 0.5)
    s_m = smooth_factors(rows[other].abs().amax(0), w_absmax, 0.5)
    curves = delta_w_energy(W, s_t, s_m, rows[other], scheme, cmc.damping, cmc.quantized_target)
    rank = core.resolve_rank(W.shape[1], W.shape[0], cmc.rank_ratio, cmc.rank, cmc.rank_floor)
    figures["cmc_rank_energy"] = plot_rank_energy(
        {k: v.tolist() for k, v in curves.items()}, out_dir / f"cmc_rank_energy_layer{layer}.png", rank,
        f"{name} q_proj, ΔW_{other} at {scheme.tag} (MAS init)")
    return figures
