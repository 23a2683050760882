"""Fidelity without a benchmark: SQNR of hidden states vs the FP model, per layer and modality.

Perplexity is measured on the text corpus of ``masquant.evaluation.text_corpus``.

SQNR_dB = 10 log10( sum |h_fp|^2 / sum |h_q - h_fp|^2 ) over the tokens of one modality.
The FP side is recorded once before quantization (offloaded to CPU, fp32) and compared after.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from tqdm.auto import tqdm


def _layer_outputs(model: nn.Module, adapter, batches: list[dict], device, store_dtype=torch.float32):
    """Per sample: [output of each decoder layer ..., final normed hidden state] on CPU.

    A model whose residual stream was transformed (a rotation; see ``ResidualBasis``) has its hidden states
    mapped back to the original basis, so they compare with a reference recorded before the transform.
    """
    from masquant.transforms.rotation import ResidualBasis

    basis = ResidualBasis.of(adapter)
    layers = list(adapter.decoder_layers()) + [adapter.final_norm()]
    current: list = []

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        current.append(h.detach().to("cpu", store_dtype))

    handles = [m.register_forward_hook(hook) for m in layers]
    outputs = []
    try:
        with torch.no_grad():
            for b in tqdm(batches, desc="fidelity pass", leave=False):
                current.clear()
                model(**{k: v.to(device) for k, v in b.items()}, use_cache=False)
                if basis is not None:
                    last = len(current) - 1
                    current[:] = [basis.to_reference(h, final=i == last).to(store_dtype) for i, h in enumerate(current)]
                outputs.append(list(current))
    finally:
        for h in handles:
            h.remove()
    return outputs


@dataclass
class FidelityReference:
    """FP per-layer hidden states of held-out samples, and their modality masks."""

    outputs: list
    masks: list = field(default_factory=list)


def record_reference(model, adapter, batches, device, video_as="vision") -> FidelityReference:
    masks = [adapter.modality_masks(b["input_ids"], video_as=video_as) for b in batches]
    return FidelityReference(_layer_outputs(model, adapter, batches, device), masks)


def sqnr_report(model, adapter, batches, device, ref: FidelityReference) -> dict:
    """{'fidelity/sqnr/<modality>/layer_<i>': dB, 'fidelity/sqnr/<modality>/e2e': dB, ...}."""
    quant = _layer_outputs(model, adapter, batches, device, store_dtype=torch.float32)
    n_layers = len(quant[0])
    signal: dict = {}
    noise: dict = {}
    for fp_sample, q_sample, masks in zip(ref.outputs, quant, ref.masks):
        for l in range(n_layers):
            fp = fp_sample[l].float()
            err = (q_sample[l] - fp).pow(2).sum(-1)  # [B, T]
            sig = fp.pow(2).sum(-1)
            for m, mask in list(masks.items()) + [("all", None)]:
                sel = torch.ones_like(sig, dtype=torch.bool) if mask is None else mask.to(sig.device)
                if not sel.any():
                    continue
                signal[(m, l)] = signal.get((m, l), 0.0) + float(sig[sel].sum())
                noise[(m, l)] = noise.get((m, l), 0.0) + float(err[sel].sum())
    report = {}
    for (m, l), s in signal.items():
        n = noise[(m, l)]
        db = float("inf") if n == 0 else 10 * math.log10(s / n)
        key = "e2e" if l == n_layers - 1 else f"layer_{l}"
        report[f"fidelity/sqnr/{m}/{key}"] = db
    return report


def unchanged_sqnr_report(adapter, batches, video_as="vision") -> dict:
    """What :func:`sqnr_report` returns for a model equal to its reference, without running it: the same keys
    (every modality present in ``batches`` and ``all``, every decoder layer and the final norm), every value +inf."""
    n_layers = len(list(adapter.decoder_layers())) + 1
    present = {"all"}
    for b in batches:
        present |= {m for m, mask in adapter.modality_masks(b["input_ids"], video_as=video_as).items() if mask.any()}
    return {f"fidelity/sqnr/{m}/{'e2e' if l == n_layers - 1 else f'layer_{l}'}": float("inf")
            for m in present for l in range(n_layers)}
