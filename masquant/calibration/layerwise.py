"""Layer-by-layer execution of the decoder on calibration samples.

The decoder-layer inputs of every sample (hidden states and the keyword arguments the model passes
to its layers: position embeddings, masks) are captured once at layer 0 and kept on an offload
device (CPU by default). Methods then walk the layers one at a time; only one layer's activations
are ever materialised on the compute device.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from masquant.quant.linear import ModalityRouter


class _StopForward(Exception):
    pass


def _to(obj, device):
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@dataclass
class LayerSample:
    """One calibration sample at the input of a decoder layer."""

    hidden: torch.Tensor  # [1, T, D]
    kwargs: dict  # what the model passes to its decoder layers (position_embeddings, attention_mask, ...)
    masks: dict[str, torch.Tensor]  # modality -> bool [1, T]


@dataclass
class LayerInputs:
    samples: list[LayerSample] = field(default_factory=list)
    offload: str = "cpu"

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[LayerSample]:
        return iter(self.samples)

    def token_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.samples:
            for m, mask in s.masks.items():
                counts[m] = counts.get(m, 0) + int(mask.sum())
        return counts


_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "cache_position")


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter, batches: list[dict], device, offload: str = "cpu",
                         video_as: str = "vision") -> LayerInputs:
    """Run the model up to decoder layer 0 for each batch and keep what layer 0 receives."""
    layer0 = adapter.decoder_layers()[0]
    captured: list[tuple] = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
        captured.append((hidden, kw))
        raise _StopForward

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    inputs = LayerInputs(offload=offload)
    try:
        for batch in tqdm(batches, desc="capture layer-0 inputs", leave=False):
            batch = _to(batch, device)
            try:
                model(**batch, use_cache=False)
            except _StopForward:
                pass
            hidden, kw = captured.pop()
            masks = adapter.modality_masks(batch["input_ids"], video_as=video_as)
            inputs.samples.append(LayerSample(_to(hidden, offload), _to(kw, offload), _to(masks, offload)))
    finally:
        handle.remove()
    return inputs


@torch.no_grad()
def run_layer(layer: nn.Module, sample: LayerSample, device, router: ModalityRouter | None = None) -> torch.Tensor:
    """Output of one decoder layer for one sample, on ``device``."""
    if router is not None:
        router.set_masks(_to(sample.masks, device))
    out = layer(_to(sample.hidden, device), **_to(sample.kwargs, device))
    return out[0] if isinstance(out, tuple) else out


def layer_sample_on(sample: LayerSample, device) -> LayerSample:
    return LayerSample(_to(sample.hidden, device), _to(sample.kwargs, device), _to(sample.masks, device))


@torch.no_grad()
def advance(layer: nn.Module, inputs: LayerInputs, device, router: ModalityRouter | None = None) -> LayerInputs:
    """Inputs of the next layer: this layer's outputs for every sample (offloaded)."""
    out = LayerInputs(offload=inputs.offload)
    for s in inputs:
        h = run_layer(layer, s, device, router)
        out.samples.append(LayerSample(h.to(inputs.offload), s.kwargs, s.masks))
    return out
