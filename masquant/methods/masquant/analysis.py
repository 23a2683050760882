"""Diagnostics a MASQuant researcher asks for (the runner wires them in; all are plain functions).

- :func:`stream_sqnr`: per-layer SQNR per modality of a quantized layer stream against the FP stream.
- :func:`channel_absmax` + :func:`plot_channel_absmax`: per-channel input ranges per modality (Fig. 2 style).
- :func:`delta_w_rank_report`: effective rank of ΔW_m with and without whitening, and the output error
  of rank-r CMC (whitened vs plain SVD) on calibration activations.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from masquant.adapters.base import INPUT_GROUPS
from masquant.calibration.layerwise import LayerInputs, LayerSample, layer_sample_on
from masquant.methods.masquant import core
from masquant.quant.linear import ModalityRouter
from masquant.quant.quantizer import quantize_weight
from masquant.quant.scheme import QuantScheme


def _db(signal: float, noise: float) -> float:
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return 10.0 * math.log10(signal / noise)


def _forward(layer: nn.Module, sample: LayerSample) -> torch.Tensor:
    out = layer(sample.hidden, **sample.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def stream_sqnr(fp_layers: Sequence[nn.Module], q_layers: Sequence[nn.Module], inputs: LayerInputs, device,
                router: ModalityRouter | None = None) -> list[dict[str, float]]:
    """SQNR (dB) per layer and modality: FP layers on the FP stream vs quantized layers on the quantized stream.

    Both streams start from the same layer-0 ``inputs``. Energies are summed over samples before the
    ratio, so each entry is 10 log10(Σ|y_fp|² / Σ|y_fp − y_q|²) over that modality's tokens at that
    layer's output; key "all" covers every token. ``router`` must be the one the quantized layers use.
    Keep an FP copy of the model (``copy.deepcopy`` before quantizing) to get ``fp_layers``.
    """
    fp = [layer_sample_on(s, device) for s in inputs]
    q = [layer_sample_on(s, device) for s in inputs]
    result = []
    for fp_layer, q_layer in zip(fp_layers, q_layers):
        energy: dict[str, list[float]] = {}
        for k, s in enumerate(inputs):
            y_fp = _forward(fp_layer, fp[k])
            if router is not None:
                router.set_masks(fp[k].masks)
            y_q = _forward(q_layer, q[k])
            masks = {"all": torch.ones_like(next(iter(s.masks.values())), dtype=torch.bool), **s.masks}
            for m, mask in masks.items():
                rows = mask.reshape(-1).to(y_fp.device)
                a = y_fp.reshape(-1, y_fp.shape[-1])[rows].double()
                b = y_q.reshape(-1, y_q.shape[-1])[rows].double()
                e = energy.setdefault(m, [0.0, 0.0])
                e[0] += float(a.pow(2).sum())
                e[1] += float((a - b).pow(2).sum())
            fp[k] = LayerSample(y_fp, fp[k].kwargs, fp[k].masks)
            q[k] = LayerSample(y_q, q[k].kwargs, q[k].masks)
        result.append({m: _db(sig, noise) for m, (sig, noise) in energy.items() if sig > 0})
    return result


@torch.no_grad()
def channel_absmax(adapter, layer_idx: int, inputs: LayerInputs, device, group: str = "qkv") -> dict[str, torch.Tensor]:
    """Per-channel max |x| per modality at the input of ``group`` (qkv | o | gate_up | down) of layer ``layer_idx``.

    ``inputs`` are the layer-0 inputs; the FP layers before ``layer_idx`` are run to reach it.
    Returns {modality: [D_in]} plus "all".
    """
    if group not in INPUT_GROUPS:
        raise ValueError(f"group={group!r}: valid choices are {list(INPUT_GROUPS)}")
    layers = adapter.decoder_layers()
    linear = adapter.linears(layers[layer_idx])[INPUT_GROUPS[group][0]]
    absmax: dict[str, torch.Tensor] = {}
    current: dict = {}

    def hook(module, args):
        x = args[0].reshape(-1, args[0].shape[-1]).float()
        masks = {"all": None, **current["masks"]}
        for m, mask in masks.items():
            rows = x if mask is None else x[mask.reshape(-1).to(x.device)]
            if rows.shape[0]:
                a = rows.abs().amax(0).cpu()
                absmax[m] = a if m not in absmax else torch.maximum(absmax[m], a)

    handle = linear.register_forward_pre_hook(hook)
    try:
        for s in inputs:
            h = layer_sample_on(s, device)
            current["masks"] = h.masks
            for layer in layers[: layer_idx + 1]:
                h = LayerSample(_forward(layer, h), h.kwargs, h.masks)
    finally:
        handle.remove()
    return absmax


def plot_channel_absmax(absmax: dict[str, torch.Tensor], path: str | Path, title: str = "",
                        modalities: Sequence[str] = ("text", "vision", "audio")) -> Path:
    """Fig. 2 style: per-channel absmax of each modality on one axis, written to a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for m in modalities:
        if m in absmax:
            ax.plot(absmax[m].numpy(), lw=0.8, alpha=0.85, label=m)
    ax.set_xlabel("input channel")
    ax.set_ylabel("max |x|")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


@torch.no_grad()
def delta_w_rank_report(W: torch.Tensor, s_text: torch.Tensor, s_m: torch.Tensor, X: torch.Tensor,
                        scheme: QuantScheme, ranks: Sequence[int] = (), damping: float = 1e-6,
                        quantized_target: bool = False) -> dict[str, float]:
    """Effective rank of ΔW_m (plain) and of T ΔW_m (whitened), and rank-r output errors of both.

    W [out, in] the FP weight, s_text / s_m [in] the scales, X [N, in] the modality's FP activations
    (unsmoothed). Errors are relative: ‖X̃ (ΔW − L)‖_F / ‖X̃ ΔW‖_F with X̃ = X / s_m.
    """
    W = W.double()
    W_q = quantize_weight(core.smooth_weight(W, s_text.double()), scheme)
    dW = core.cmc_residual(W, s_m, W_q, scheme if quantized_target else None)  # [in, out]
    Xs = X.double() / s_m.double()
    T, T_inv = core.whitening(Xs.T @ Xs, damping)
    report = {"erank/plain": core.effective_rank(dW), "erank/whitened": core.effective_rank(T @ dW),
              "full_rank": min(dW.shape)}
    base = core.output_error(Xs, dW)
    for r in ranks:
        for name, (t, ti) in (("plain", (None, None)), ("whitened", (T, T_inv))):
            L1, L2 = core.whitened_low_rank(dW, t, ti, r)
            report[f"rel_err/{name}/rank_{r}"] = core.output_error(Xs, dW - L1 @ L2) / base if base > 0 else 0.0
    return report
