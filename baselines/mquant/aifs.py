"""AIFS at inference: every decoder layer of a prefill runs its tokens visual-first (MQuant §3.3).

Forward hooks on the decoder layers, active only when a call has non-text tokens after text ones (prefill;
a decoding step has one token and is left alone). Before a layer, the adapter reorders its call
(:meth:`ModelAdapter.reorder_layer_call`: hidden states, position embeddings and ids, and the attention
mask permuted so each token keeps its positions and sees the same tokens) and the router's modality masks
follow, so each modality's static scale applies to one contiguous block; after the layer its output is put
back in the original order. Between layers the stream is in the original order, so the model's own steps
there (Qwen3-VL's DeepStack), the fidelity hooks and the KV cache of later decoding need no change.

One order per call: a batch whose rows have different modality layouts runs in its own order.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

from baselines.mquant.core import visual_first_order

log = logging.getLogger(__name__)


class AIFS:
    """The hooks of one model; ``attach()`` installs them, ``detach()`` removes them, ``calls`` counts reorders."""

    def __init__(self, adapter, router):
        self.adapter = adapter
        self.router = router
        self.calls = 0
        self._handles: list = []
        self._saved: list = []  # per active layer call: (inverse permutation, the router's masks before)

    def attach(self) -> "AIFS":
        for layer in self.adapter.decoder_layers():
            self._handles.append(layer.register_forward_pre_hook(self._before, with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._after))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _order(self, B: int, T: int) -> torch.Tensor | None:
        masks = self.router.masks if self.router is not None else None
        if T < 2 or not masks or "text" not in masks or masks["text"].numel() != B * T:
            return None
        text = masks["text"].reshape(B, T)
        if B > 1 and not bool((text == text[:1]).all()):
            return None
        return visual_first_order(text[0])

    def _before(self, layer: nn.Module, args: tuple, kwargs: dict):
        hidden = args[0] if args else kwargs["hidden_states"]
        B, T = hidden.shape[:2]
        perm = self._order(B, T)
        if perm is None:
            self._saved.append(None)
            return None
        perm = perm.to(hidden.device)
        args, kwargs = self.adapter.reorder_layer_call(args, kwargs, perm)
        before = self.router.masks
        self.router.set_masks({m: mask.reshape(B, T)[:, perm] for m, mask in before.items()})
        self._saved.append((torch.argsort(perm), before))
        self.calls += 1
        return args, kwargs

    def _after(self, layer: nn.Module, args, output):
        saved = self._saved.pop()
        if saved is None:
            return None
        inverse, before = saved
        self.router.set_masks(before)
        if isinstance(output, tuple):
            return (output[0][:, inverse], *output[1:])
        return output[:, inverse]
