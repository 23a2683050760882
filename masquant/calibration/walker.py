"""The one layer walker: the model's own forward pass, one decoder layer at a time.

:func:`capture_layer_inputs` runs the model once per calibration sample with every decoder layer
replaced by a pass-through, and records what each layer receives: layer 0's hidden state, each layer's
OWN keyword arguments (attention masks and rotary embeddings differ by layer type in Gemma 3 and in
models with sliding-window layers), and what the adapter needs to redo the model's steps between layers
(Qwen3-VL's DeepStack). Tensors shared by several layers are stored once, on the offload device.

:class:`LayerWalker` then walks the layers. Each step computes the layer's output on the FP stream
(the layer as it is when the step begins, with optional observers on its linears' inputs), hands the
step to the method, and advances: the FP stream by those outputs, the optional quantized stream by the
layer as the method left it. Between layers the adapter's own step is applied to both streams. Only one
layer's activations are ever on the compute device; statistics are running, never stored activations.

Every method, the statistics and the analysis walk through here: :func:`call_layer` is the only place
that runs one decoder layer.

Stacks of blocks outside the decoder (a vision encoder, for MQuant's encoder quantization) are walked the same
way: :func:`capture_block_inputs` records block 0's input and each block's own keyword arguments (Qwen2.5-VL's
windowed and full-attention blocks get different ``cu_seqlens``) from the model's own forward, stopped at the
encoder's exit; :class:`BlockWalker` steps the blocks with an FP and an optional quantized stream.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from masquant.placement import resident

_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "cache_position", "hidden_states")


class _StopForward(Exception):
    pass


def to_device(obj, device, memo: dict | None = None):
    """Move tensors inside nested tuples/lists/dicts; with ``memo``, a tensor seen twice is moved once."""
    if torch.is_tensor(obj):
        if memo is None:
            return obj.to(device)
        key = id(obj)
        if key not in memo:
            memo[key] = (obj, obj.to(device))  # keep obj alive so its id is not reused
        return memo[key][1]
    if isinstance(obj, tuple):
        return tuple(to_device(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device, memo) for k, v in obj.items()}
    return obj


@dataclass
class SampleRecord:
    """One calibration sample as the decoder sees it."""

    hidden: torch.Tensor  # layer-0 input [1, T, D]
    layer_kwargs: list[dict]  # per layer: what the model passes (position_embeddings, attention_mask, ...)
    masks: dict[str, torch.Tensor]  # modality -> bool [1, T]
    between: dict | None = None  # the adapter's state for its between-layer step


@dataclass
class CapturedInputs:
    samples: list[SampleRecord] = field(default_factory=list)
    offload: str = "cpu"

    def __len__(self) -> int:
        return len(self.samples)

    def token_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.samples:
            for m, mask in s.masks.items():
                counts[m] = counts.get(m, 0) + int(mask.sum())
        return counts


@dataclass
class LayerSample:
    """One sample at the input of one decoder layer, on the compute device."""

    hidden: torch.Tensor
    kwargs: dict
    masks: dict[str, torch.Tensor]


def call_layer(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Output hidden state of one decoder layer (layers return a tensor, older ones a tuple)."""
    out = layer(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


@contextmanager
def _layers_passthrough(layers: Sequence[nn.Module]):
    for layer in layers:
        layer.forward = _passthrough  # instance attribute: hooks still run, the layer's compute does not
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter, batches: list[dict], device, offload: str = "cpu",
                         video_as: str = "vision", desc: str = "capture decoder inputs") -> CapturedInputs:
    """Per batch: layer 0's input, each layer's own keyword arguments and the between-layer state."""
    layers = list(adapter.decoder_layers())
    record: dict = {}
    handles = []

    def layer_hook(idx):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            record["shapes"].append(tuple(hidden.shape))
            if idx == 0:
                record["hidden"] = hidden
            record["kwargs"][idx] = {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS}
        return hook

    def lm_hook(module, args, kwargs):
        record["between"] = adapter.between_layers_state(kwargs)

    def stop(module, args):
        raise _StopForward

    handles.append(adapter.language_model().register_forward_pre_hook(lm_hook, with_kwargs=True))
    handles += [layer.register_forward_pre_hook(layer_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    handles.append(adapter.final_norm().register_forward_pre_hook(stop))
    captured = CapturedInputs(offload=offload)
    try:
        with _layers_passthrough(layers):
            for batch in tqdm(batches, desc=desc, leave=False):
                record.update(kwargs=[None] * len(layers), shapes=[], between=None)
                batch = to_device(batch, device)
                try:
                    model(**batch, use_cache=False)
                except _StopForward:
                    pass
                if any(kw is None for kw in record["kwargs"]) or len(set(record["shapes"])) != 1:
                    raise RuntimeError(
                        f"{type(model).__name__}: capturing decoder inputs saw {len(record['shapes'])} layer calls "
                        f"with shapes {sorted(set(record['shapes']))} for {len(layers)} layers; the adapter "
                        f"{type(adapter).__name__} does not describe this model's decoder loop")
                memo: dict = {}
                masks = adapter.modality_masks(batch["input_ids"], video_as=video_as)
                captured.samples.append(SampleRecord(
                    to_device(record["hidden"], offload, memo), to_device(record["kwargs"], offload, memo),
                    to_device(masks, offload), to_device(record["between"], offload, memo)))
    finally:
        for h in handles:
            h.remove()
    return captured


@dataclass
class BlockCall:
    """One call of a module inside a decoder layer (the attention, the MLP, a linear): the positional and
    keyword arguments the layer passed it, on the offload device. The input hidden state is the first
    positional argument, or ``hidden_states`` when the layer passes it by keyword (HF attention blocks)."""

    args: tuple
    kwargs: dict

    @property
    def input(self) -> torch.Tensor:
        return self.args[0] if self.args else self.kwargs["hidden_states"]

    def run(self, module: nn.Module, device, x: torch.Tensor | None = None) -> torch.Tensor:
        """``module``'s output (the first element when it returns a tuple) on this call's arguments, on
        ``device``; ``x`` replaces the input hidden state."""
        memo: dict = {}
        args, kwargs = to_device(self.args, device, memo), to_device(self.kwargs, device, memo)
        if x is not None:
            if args:
                args = (x.to(device),) + args[1:]
            else:
                kwargs = {**kwargs, "hidden_states": x.to(device)}
        out = module(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


class InputObserver(Protocol):
    """Sees the input rows of one input group's linear: x [N, D] and the rows' modality masks {m: bool[N]}."""

    def observe(self, group: str, x: torch.Tensor, masks: dict[str, torch.Tensor]) -> None: ...


@contextmanager
def observing(adapter, layer: nn.Module, observers: Sequence[InputObserver], current: dict):
    """Forward pre-hooks on one linear per input group that pass its input rows to every observer.

    A linear with an ``input_transform`` (an online Hadamard) is observed after it: observers see the rows its
    weight multiplies.
    """
    with observing_linears(adapter.input_group_linears(layer), observers, current):
        yield


@contextmanager
def observing_linears(group_linears: dict[str, nn.Module], observers: Sequence[InputObserver], current: dict):
    """:func:`observing` on given linears {input group: linear}; ``current["masks"]`` holds the rows' masks."""
    handles = []
    for group, linear in group_linears.items():
        def hook(module, args, group=group):
            x = args[0]
            transform = getattr(module, "input_transform", None)
            if transform is not None:
                x = transform(x)
            x = x.reshape(-1, x.shape[-1])
            masks = {m: mask.reshape(-1).to(x.device) for m, mask in current["masks"].items()}
            for obs in observers:
                obs.observe(group, x, masks)
        handles.append(linear.register_forward_pre_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class LayerStep:
    """One decoder layer during a walk; ``fp_outputs`` are its outputs as it was when the step began."""

    def __init__(self, walker: "LayerWalker", index: int, layer: nn.Module, device=None):
        self.walker = walker
        self.index = index
        self.layer = layer
        # where the layer runs during this step (masquant.placement.resident): the walk's compute device, or the
        # layer's own GPU under a device map; per-layer work (statistics, searches, learning) belongs there
        self.device = walker.device if device is None else torch.device(device)
        self.fp_outputs: list[torch.Tensor] | None = None
        self.stats = None  # filled by QuantContext.walk when statistics were asked for
        self._quant_outputs: list[torch.Tensor] | None = None

    @property
    def n_samples(self) -> int:
        return len(self.walker.captured)

    def sample(self, stream: str, k: int) -> LayerSample:
        """Sample ``k`` at this layer's input on the compute device; stream 'fp' or 'quant'."""
        rec = self.walker.captured.samples[k]
        memo: dict = {}
        return LayerSample(self.walker.stream(stream)[k].to(self.device),
                           to_device(rec.layer_kwargs[self.index], self.device, memo),
                           to_device(rec.masks, self.device))

    def run(self, stream: str = "fp", layer: nn.Module | None = None, observers: Sequence[InputObserver] = (),
            keep: bool = True, samples: Sequence[int] | None = None) -> list[torch.Tensor] | None:
        """Outputs of ``layer`` (default: this step's layer as it is now) on the samples of ``stream``
        (all, or the indices in ``samples``)."""
        layer = self.layer if layer is None else layer
        outputs = [] if keep else None
        current: dict = {}
        with torch.no_grad(), observing(self.walker.adapter, layer, observers, current):
            for k in (range(self.n_samples) if samples is None else samples):
                s = self.sample(stream, k)
                current["masks"] = s.masks
                if self.walker.router is not None:
                    self.walker.router.set_masks(s.masks)
                y = call_layer(layer, s.hidden, s.kwargs)
                if keep:
                    outputs.append(y.to(self.walker.captured.offload))
        return outputs

    def block_calls(self, module: nn.Module, stream: str = "fp") -> list[BlockCall]:
        """What ``module`` (a block inside this layer) receives, per sample, when the layer as it is now runs on
        ``stream``: its arguments exactly as the layer passes them (the attention's position embeddings and
        masks, the MLP's post-norm input), on the offload device. One pass of the layer; the caller holds one
        block's inputs at a time, so memory stays at one stream's worth."""
        calls: list[BlockCall] = []
        offload = self.walker.captured.offload

        def hook(mod, args, kwargs):
            memo: dict = {}
            calls.append(BlockCall(to_device(args, offload, memo), to_device(kwargs, offload, memo)))

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.run(stream, keep=False)
        finally:
            handle.remove()
        if len(calls) != self.n_samples:
            raise RuntimeError(f"{type(module).__name__} was called {len(calls)} times for {self.n_samples} samples; "
                               "block_calls needs a module the layer calls once per forward")
        return calls

    def quant_outputs(self) -> list[torch.Tensor]:
        """Outputs of the layer as it is now on the quantized stream (computed once; the walk advances with them)."""
        if self._quant_outputs is None:
            self._quant_outputs = self.run("quant")
        return self._quant_outputs


class LayerWalker:
    """Iterate :class:`LayerStep` s over the decoder, reproducing the model's forward layer by layer.

    ``quantized_stream``: also keep a second stream fed by the layers as the method leaves them (each
    layer sees the previous quantized layers' outputs, as GPTQ and OmniQuant-style learning need).
    ``fp_observers(step)``: observers of the FP pass of each layer (running statistics, Gram matrices).
    ``router``: the modality router of the model's QuantLinears; its masks are set for every sample.
    """

    def __init__(self, adapter, captured: CapturedInputs, device, *, quantized_stream: bool = False,
                 fp_stream: bool = True, router=None,
                 fp_observers: Callable[[LayerStep], Sequence[InputObserver]] | None = None,
                 desc: str = "layers", layers: Sequence[int] | None = None):
        if not (fp_stream or quantized_stream):
            raise ValueError("a walk needs at least one stream (fp_stream or quantized_stream)")
        self.adapter = adapter
        self.captured = captured
        self.device = torch.device(device)
        self.router = router
        self.fp_observers = fp_observers
        self.desc = desc
        start = [s.hidden for s in captured.samples]
        self._fp = start if fp_stream else None
        self._q = list(start) if quantized_stream else None
        self.stop_after = None if layers is None else max(layers)

    def stream(self, name: str) -> list[torch.Tensor]:
        if name == "fp":
            if self._fp is None:
                raise ValueError("this walk has no FP stream (LayerWalker(..., fp_stream=False))")
            return self._fp
        if name == "quant":
            if self._q is None:
                raise ValueError("this walk has no quantized stream (LayerWalker(..., quantized_stream=True))")
            return self._q
        raise ValueError(f"stream={name!r}: valid streams are 'fp' and 'quant'")

    def _after(self, idx: int, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for rec, h in zip(self.captured.samples, outputs):
            state = None if rec.between is None else to_device(rec.between, h.device)
            out.append(self.adapter.after_layer(idx, h, state))
        return out

    def __iter__(self) -> Iterator[LayerStep]:
        layers = self.adapter.decoder_layers()
        last = len(layers) - 1 if self.stop_after is None else self.stop_after
        for i in tqdm(range(last + 1), desc=self.desc, leave=False):
            with resident(layers[i], self.device) as device:  # one layer on the compute device at a time
                step = LayerStep(self, i, layers[i], device)
                observers = self.fp_observers(step) if self.fp_observers is not None else ()
                if self._fp is not None:
                    step.fp_outputs = step.run("fp", observers=observers)
                yield step
                if self._q is not None:
                    self._q = self._after(i, step.quant_outputs())
                if self._fp is not None:
                    self._fp = self._after(i, step.fp_outputs)
                step.fp_outputs = step._quant_outputs = None

    def final_hidden(self, stream: str = "fp") -> list[torch.Tensor]:
        """The streams after the last walked layer (before the final norm)."""
        return self.stream(stream)


# --- stacks of blocks outside the decoder (a vision encoder) ------------------------------------------------
@dataclass
class BlockRecord:
    """One calibration sample at the input of a stack of blocks: block 0's input and each block's own kwargs."""

    hidden: torch.Tensor
    block_calls: list[BlockCall]  # per block: its arguments as the encoder passes them


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks: Sequence[nn.Module], stop: nn.Module, batches: list[dict], device,
                         offload: str = "cpu", desc: str = "capture encoder inputs") -> list[BlockRecord]:
    """Per batch, what each block of ``blocks`` receives when the model runs its own forward, up to ``stop``
    (the first module after the blocks, e.g. the encoder's exit norm); the blocks' compute is skipped.
    Batches whose forward never reaches the blocks (no image) give no record; a batch that calls the blocks
    more than once per block (several encoder calls) is refused."""
    record: dict = {}

    def block_hook(idx):
        def hook(module, args, kwargs):
            if record["kwargs"][idx] is not None:
                raise RuntimeError(f"block {idx} was called twice in one forward; capture one encoder call per batch")
            hidden = args[0] if args else kwargs["hidden_states"]
            if idx == 0:
                record["hidden"] = hidden
            # the blocks are pass-throughs: every block gets the same hidden state (stored once, by the memo below)
            record["kwargs"][idx] = BlockCall(tuple(args), {k: v for k, v in kwargs.items() if k not in _DROP_KWARGS})
        return hook

    def stop_hook(module, args):
        raise _StopForward

    handles = [b.register_forward_pre_hook(block_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles.append(stop.register_forward_pre_hook(stop_hook))
    records: list[BlockRecord] = []
    try:
        with _layers_passthrough(blocks):
            for batch in tqdm(batches, desc=desc, leave=False):
                record.update(kwargs=[None] * len(blocks), hidden=None)
                try:
                    model(**to_device(batch, device), use_cache=False)
                except _StopForward:
                    pass
                if record["hidden"] is None:
                    continue
                memo: dict = {}
                records.append(BlockRecord(to_device(record["hidden"], offload, memo),
                                           to_device(record["kwargs"], offload, memo)))
    finally:
        for h in handles:
            h.remove()
    return records


class BlockStep:
    """One block of a :class:`BlockWalker`; ``fp_outputs`` are its outputs as it was when the step began."""

    def __init__(self, walker: "BlockWalker", index: int, block: nn.Module, device=None):
        self.walker, self.index, self.block = walker, index, block
        self.device = walker.device if device is None else torch.device(device)  # where the block runs (resident)
        self.fp_outputs: list[torch.Tensor] | None = None
        self._quant_outputs: list[torch.Tensor] | None = None

    def run(self, stream: str = "fp", group_linears: dict[str, nn.Module] | None = None,
            observers: Sequence[InputObserver] = (), keep: bool = True) -> list[torch.Tensor] | None:
        """Outputs of the block as it is now on ``stream``; observers see the inputs of ``group_linears``."""
        w = self.walker
        outputs = [] if keep else None
        current = {"masks": {}}
        with torch.no_grad(), observing_linears(group_linears or {}, observers, current):
            for rec, h in zip(w.records, w.stream(stream)):
                y = rec.block_calls[self.index].run(self.block, self.device, h)
                if keep:
                    outputs.append(y.to(w.offload))
        return outputs

    def quant_outputs(self) -> list[torch.Tensor]:
        if self._quant_outputs is None:
            self._quant_outputs = self.run("quant")
        return self._quant_outputs


class BlockWalker:
    """:class:`LayerWalker` for a stack of blocks outside the decoder (a vision encoder's), from
    :func:`capture_block_inputs`: an FP stream and an optional quantized stream, one block at a time."""

    def __init__(self, blocks: Sequence[nn.Module], records: list[BlockRecord], device, *,
                 quantized_stream: bool = False, fp_stream: bool = True,
                 fp_observers: Callable[[BlockStep], tuple[dict, Sequence[InputObserver]]] | None = None,
                 offload: str = "cpu", desc: str = "blocks"):
        if not (fp_stream or quantized_stream):
            raise ValueError("a walk needs at least one stream (fp_stream or quantized_stream)")
        self.blocks, self.records, self.device, self.offload = blocks, records, torch.device(device), offload
        self.fp_observers, self.desc = fp_observers, desc
        start = [r.hidden for r in records]
        self._fp = start if fp_stream else None
        self._q = list(start) if quantized_stream else None

    def stream(self, name: str) -> list[torch.Tensor]:
        out = {"fp": self._fp, "quant": self._q}.get(name)
        if out is None:
            raise ValueError(f"this walk has no stream {name!r}")
        return out

    def __iter__(self) -> Iterator[BlockStep]:
        for i in tqdm(range(len(self.blocks)), desc=self.desc, leave=False):
            with resident(self.blocks[i], self.device) as device:  # as LayerWalker: a block runs where it lives
                step = BlockStep(self, i, self.blocks[i], device)
                if self._fp is not None:
                    linears, observers = self.fp_observers(step) if self.fp_observers is not None else ({}, ())
                    step.fp_outputs = step.run("fp", linears, observers)
                yield step
                if self._q is not None:
                    self._q = step.quant_outputs()
                if self._fp is not None:
                    self._fp = step.fp_outputs
                step.fp_outputs = step._quant_outputs = None
