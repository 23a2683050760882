"""MQuant's official static-scale calibration: after GPTQ, on the weight-quantized model, while it generates.

The released code quantizes the weights first, then runs the model with its activation quantizers in observer
mode over the calibration prompts, generating 20 new tokens from each, and only then fixes every static scale.
So the scales see what the deployed model computes (its quantized weights' outputs) and the text tokens it
decodes, not only the prompts of the full-precision model.

:class:`ScaleObserver` records, per deployed linear and per modality, the per-channel abs-max of the rows its
quantizer sees (after its online transform); :func:`observe_generation` runs the generation with activation
quantization off (:func:`masquant.quant.linear.activations_unquantized`); the method turns the abs-max into scales
(:func:`baselines.mquant.core.msq_scale`). Decoded tokens are text tokens (the router's masks of a decoding step).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from masquant.quant.linear import QuantLinear, activations_unquantized


class ScaleObserver:
    """Forward pre-hooks on QuantLinears: per linear, {modality or "all": per-channel abs-max [in]}."""

    def __init__(self, linears: dict[str, QuantLinear], router):
        self.router = router
        self.absmax: dict[str, dict[str, torch.Tensor]] = {name: {} for name in linears}
        self.tokens: dict[str, int] = {}
        self._counted = next(iter(linears), None)  # tokens are counted at one linear (every one sees them all)
        self._handles = [lin.register_forward_pre_hook(self._hook(name)) for name, lin in linears.items()]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            if module.input_transform is not None:
                x = module.input_transform(x)
            x = x.detach().reshape(-1, x.shape[-1]).abs().float()
            masks = self.router.masks if self.router is not None else None
            parts = {"all": x}
            if masks:
                parts.update({m: x[mask.to(x.device)] for m, mask in masks.items() if mask.numel() == x.shape[0]})
            seen = self.absmax[name]
            for m, rows in parts.items():
                if rows.shape[0] == 0:
                    continue
                peak = rows.amax(0).cpu()
                seen[m] = peak if m not in seen else torch.maximum(seen[m], peak)
                if name == self._counted:
                    self.tokens[m] = self.tokens.get(m, 0) + rows.shape[0]
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


@torch.no_grad()
def observe_generation(model: nn.Module, batches: list[dict], observer: ScaleObserver, new_tokens: int,
                       device) -> None:
    """Greedy generation of ``new_tokens`` from every calibration prompt, activations unquantized; the observer
    sees the prompt pass and every decoding step."""
    from masquant.engine.walker import to_device

    with activations_unquantized(model):
        for batch in tqdm(batches, desc=f"mquant scales ({new_tokens} generated tokens)", leave=False):
            batch = to_device(batch, device)
            if new_tokens > 0:  # up to new_tokens (the official max_new_tokens=20: an end-of-sequence stops it)
                model.generate(**batch, max_new_tokens=new_tokens, do_sample=False)
            else:
                model(**batch, use_cache=False)
