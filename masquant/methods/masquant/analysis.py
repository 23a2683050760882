"""Diagnostics a MASQuant researcher asks for (the runner wires them in; all are plain functions).

- :func:`stream_sqnr`: per-layer SQNR per modality of a quantized layer stream against the FP stream.
- :func:`channel_absmax` (+ ``reporting.plots.plot_channel_absmax``): per-channel input ranges per modality (Fig. 2 style).
- :func:`delta_w_rank_report`: effective rank of ΔW_m with and without whitening, and the output error
  of rank-r CMC (whitened vs plain SVD) on calibration activations.
- :func:`delta_w_energy`: the cumulative singular-value energy of ΔW_m, plain and whitened (the rank/energy
  curve behind CMC's rank choice).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from masquant.adapters.base import INPUT_GROUPS
from masquant.calibration.stats import RunningInputStats
from masquant.engine.walker import CapturedInputs, StackWalker
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


@torch.no_grad()
def stream_sqnr(fp_adapter, q_adapter, captured: CapturedInputs, device, router: ModalityRouter | None = None
                ) -> list[dict[str, float]]:
    """SQNR (dB) per layer and modality: the FP model's layers on the FP stream vs the quantized model's
    layers on the quantized stream, both walked from the same captured decoder inputs.

    Energies are summed over samples before the ratio, so each entry is 10 log10(Σ|y_fp|² / Σ|y_fp − y_q|²)
    over that modality's tokens at that layer's output; key "all" covers every token. ``router`` must be
    the one the quantized layers use. Keep an FP copy of the model (``copy.deepcopy`` before quantizing).
    """
    result = []
    walks = zip(StackWalker(fp_adapter.decoder_stack(), captured, device, desc="FP stream"),
                StackWalker(q_adapter.decoder_stack(), captured, device, router=router, desc="quantized stream"))
    for fp_step, q_step in walks:
        energy: dict[str, list[float]] = {}
        for rec, y_fp, y_q in zip(captured.samples, fp_step.fp_outputs, q_step.fp_outputs):
            masks = {"all": torch.ones_like(next(iter(rec.masks.values())), dtype=torch.bool), **rec.masks}
            for m, mask in masks.items():
                rows = mask.reshape(-1)
                a = y_fp.reshape(-1, y_fp.shape[-1])[rows].double()
                b = y_q.reshape(-1, y_q.shape[-1])[rows].double()
                e = energy.setdefault(m, [0.0, 0.0])
                e[0] += float(a.pow(2).sum())
                e[1] += float((a - b).pow(2).sum())
        result.append({m: _db(sig, noise) for m, (sig, noise) in energy.items() if sig > 0})
    return result


@torch.no_grad()
def channel_absmax(adapter, layer_idx: int, captured: CapturedInputs, device, group: str = "qkv"
                   ) -> dict[str, torch.Tensor]:
    """Per-channel max |x| per modality at the input of ``group`` (qkv | o | gate_up | down) of layer ``layer_idx``.

    The FP layers up to ``layer_idx`` are walked from the captured decoder inputs. Returns {modality: [D_in]}
    plus "all" (modalities without tokens are left out).
    """
    if group not in INPUT_GROUPS:
        raise ValueError(f"group={group!r}: valid choices are {list(INPUT_GROUPS)}")
    modalities = tuple(captured.samples[0].masks)
    seen: dict[int, RunningInputStats] = {}

    def observers(step):
        if step.index != layer_idx:
            return []
        seen[layer_idx] = RunningInputStats.for_block(step.stack, step.block, modalities)
        return [seen[layer_idx]]

    for _ in StackWalker(adapter.decoder_stack(), captured, device, fp_observers=observers, last=layer_idx,
                         desc="to layer"):
        pass
    return {m: st.absmax for m, st in seen[layer_idx].stats[group].items() if st.count > 0}


@torch.no_grad()
def layer_input_rows(adapter, layer_idx: int, captured: CapturedInputs, device, group: str = "qkv"
                     ) -> dict[str, torch.Tensor]:
    """Every input row of ``group`` at layer ``layer_idx``, per modality, on the CPU (diagnostics only:
    this stores activations of one layer; the methods keep running statistics instead)."""
    rows: dict[str, list[torch.Tensor]] = {}

    class _Rows:
        def observe(self, g, x, masks):
            if g == group:
                for m, mask in masks.items():
                    rows.setdefault(m, []).append(x[mask].float().cpu())

    for _ in StackWalker(adapter.decoder_stack(), captured, device, last=layer_idx, desc="to layer",
                         fp_observers=lambda step: [_Rows()] if step.index == layer_idx else []):
        pass
    return {m: torch.cat(parts) for m, parts in rows.items()}


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


def cumulative_energy(M: torch.Tensor) -> torch.Tensor:
    """Fraction of ‖M‖_F² kept by the best rank-r approximation, r = 1 .. min(M.shape): cumsum(σ²) / Σσ²."""
    energy = torch.linalg.svdvals(M.double()).pow(2)
    total = energy.sum()
    return energy.cumsum(0) / total if total > 0 else torch.ones_like(energy)


@torch.no_grad()
def delta_w_energy(W: torch.Tensor, s_text: torch.Tensor, s_m: torch.Tensor, X: torch.Tensor, scheme: QuantScheme,
                   damping: float = 1e-2, quantized_target: bool = False) -> dict[str, torch.Tensor]:
    """Cumulative singular-value energy of ΔW_m (plain) and of T ΔW_m (whitened by the modality's smoothed
    activations X / s_m, Theorem 2): how much of the output error a rank-r CMC branch can remove.

    W [out, in], s_text / s_m [in], X [N, in] the modality's FP activations (unsmoothed)."""
    W = W.double()
    W_q = quantize_weight(core.smooth_weight(W, s_text.double()), scheme)
    dW = core.cmc_residual(W, s_m, W_q, scheme if quantized_target else None)  # [in, out]
    Xs = X.double() / s_m.double()
    T, _ = core.whitening(Xs.T @ Xs, damping)
    return {"ΔW (plain SVD)": cumulative_energy(dW), "T ΔW (whitened)": cumulative_energy(T @ dW)}
