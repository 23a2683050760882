"""Where the model's weights live during a run (``model.placement``).

- ``device`` (default): the whole model on ``device``.
- ``offload``: the decoder layers stay in CPU memory and everything else (embeddings, encoders, final norm,
  lm_head) goes to ``device``. The layer-by-layer stages (the walker: statistics, smoothing, learning, GPTQ)
  bring one layer at a time to ``device`` and send it back when its step ends; whole-model passes (the FP
  reference, SQNR, perplexity, the benchmarks) stream each layer through ``device`` as it runs. Peak
  accelerator memory is the non-layer modules plus one layer and its activations, for a model whose layers do
  not fit; the benchmarks are slower (every forward moves every layer).
- ``auto``: accelerate's device map over every visible GPU (``infer_auto_device_map`` with the decoder layer
  and the encoders' block classes kept whole, ``model.max_memory_gib`` per GPU if given), for a model too big
  for one GPU. Each layer runs where it lives: the walker moves a layer's inputs to it, never the layer.

A layer "lives" where its first parameter is (:func:`module_device`). :func:`resident` is the one rule the
walker uses: a layer on an accelerator runs there; a layer in CPU memory runs on the compute device for the
duration of its step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

PLACEMENTS = ("device", "offload", "auto")
_PINNED = "_masquant_pinned"  # set on a layer while the walker holds it on the compute device


def module_device(module: nn.Module) -> torch.device:
    """The device of the module's first parameter (else buffer); CPU for a module with neither."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def _move(module: nn.Module, device: torch.device) -> None:
    """Move a module's parameters and buffers in place (the one place placement moves weights)."""
    module.to(device)


def runs_on(layer: nn.Module, device: torch.device) -> torch.device:
    """Where ``layer`` runs for a compute ``device``: where it lives when that is an accelerator (a device map),
    else ``device`` (a layer in CPU memory is brought there)."""
    home = module_device(layer)
    return home if home.type != "cpu" else torch.device(device)


@contextmanager
def resident(layer: nn.Module, device) -> Iterator[torch.device]:
    """Hold ``layer`` where it runs (:func:`runs_on`) for the block; a layer brought from CPU memory goes back
    when the block ends, with whatever the method put into it (quantized linears included)."""
    device = torch.device(device)
    home = module_device(layer)
    target = runs_on(layer, device)
    moved = home != target
    if moved:
        _move(layer, target)
    setattr(layer, _PINNED, getattr(layer, _PINNED, 0) + 1)
    try:
        yield target
    finally:
        setattr(layer, _PINNED, getattr(layer, _PINNED) - 1)
        if moved:
            _move(layer, home)


def stream_layers_(layers: nn.ModuleList, device) -> list:
    """Forward hooks that bring each layer in CPU memory to ``device`` for its forward and send it back after
    (unless the walker holds it: :func:`resident`). Returns the hook handles."""
    device = torch.device(device)
    handles = []
    for layer in layers:
        def pre(module, args, kwargs):
            if getattr(module, _PINNED, 0) == 0 and module_device(module) != device:
                _move(module, device)
                module._masquant_streamed = True

        def post(module, args, kwargs, output):
            if getattr(module, "_masquant_streamed", False):
                module._masquant_streamed = False
                _move(module, torch.device("cpu"))

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(layer.register_forward_hook(post, with_kwargs=True))
    return handles


@contextmanager
def _layers_detached(layers: nn.ModuleList):
    originals = list(layers)
    for i in range(len(layers)):
        layers[i] = nn.Identity()
    try:
        yield originals
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def place_model_(model: nn.Module, adapter, placement: str, device, max_memory_gib: float | None = None) -> nn.Module:
    """Put ``model`` (loaded in CPU memory) where ``placement`` says; returns it (in eval mode)."""
    device = torch.device(device)
    if placement == "device":
        return model.to(device).eval()
    if placement == "offload":
        layers = adapter.decoder_layers()
        with _layers_detached(layers) as originals:
            model.to(device)
        for layer in originals:
            _move(layer, torch.device("cpu"))
        if device.type != "cpu":
            stream_layers_(layers, device)
        return model.eval()
    if placement == "auto":
        return dispatch_(model, adapter, max_memory_gib).eval()
    raise ValueError(f"model.placement={placement!r}: valid choices are {', '.join(PLACEMENTS)}")


def no_split_classes(model: nn.Module, adapter) -> list[str]:
    """Module classes a device map must keep whole: the decoder layer and each encoder's repeated block."""
    names = {type(adapter.decoder_layers()[0]).__name__}
    for encoder in adapter.encoders().values():
        for module in encoder.modules():
            if isinstance(module, nn.ModuleList) and len(module) > 0:
                names.add(type(module[0]).__name__)
    return sorted(names)


def dispatch_(model: nn.Module, adapter, max_memory_gib: float | None = None) -> nn.Module:
    """accelerate's device map over the visible GPUs, blocks kept whole (see the module docstring)."""
    from accelerate import dispatch_model, infer_auto_device_map

    if not torch.cuda.is_available():
        raise RuntimeError("model.placement=auto needs CUDA GPUs; use model.placement=device or offload")
    max_memory = None
    if max_memory_gib is not None:
        max_memory = {i: f"{max_memory_gib}GiB" for i in range(torch.cuda.device_count())}
        max_memory["cpu"] = "1024GiB"
    device_map = infer_auto_device_map(model, max_memory=max_memory,
                                       no_split_module_classes=no_split_classes(model, adapter))
    return dispatch_model(model, device_map=device_map)
