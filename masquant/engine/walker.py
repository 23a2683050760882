"""The one walker: a stack of blocks (the decoder's layers, a vision encoder's blocks), one block at a time, with
the arguments the model itself gives each block.

A :class:`BlockStack` (from the adapter: ``decoder_stack``, ``vision_stack``) says what a stack is: its blocks,
the module after the last one, the linears of a block by role and the input groups they share, what the model
does between two blocks (Qwen3-VL's DeepStack) and which modality each token has.

:func:`capture_stack_inputs` runs the model's own forward once per calibration batch with every block replaced
by a pass-through, stopped at the stack's exit, and records what each block receives: block 0's input and each
block's OWN arguments (attention masks and rotary embeddings differ by layer type in Gemma 3 and in models with
sliding-window layers; Qwen2.5-VL's windowed and full-attention vision blocks get different ``cu_seqlens``).
Tensors shared by several blocks are stored once, on the offload device.

:class:`StackWalker` then walks the blocks. Each step computes the block's output on the FP stream (the block as
it is when the step begins, with optional observers on its linears' inputs), hands the step to the caller, and
advances: the FP stream by those outputs, the optional quantized stream by the block as the caller left it.
Between blocks the stack's own step is applied to both streams. Only one block's activations are on the compute
device at a time; statistics are running, never stored activations. :meth:`BlockCall.run` is the only place
that runs one block.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Protocol, Sequence

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from masquant.adapters.stack import BlockStack
from masquant.engine.placement import resident
from masquant.quant.linear import activations_unquantized

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
class BlockCall:
    """One call of a module: its positional arguments after the input and its keyword arguments, on the offload
    device. The input is the first positional argument, or ``hidden_states`` when passed by keyword."""

    args: tuple
    kwargs: dict
    input: torch.Tensor | None = None  # the recorded input (BlockCall.record keeps it; stack records drop it)
    by_keyword: bool = False

    @classmethod
    def record(cls, args: tuple, kwargs: dict, device, memo: dict | None = None, keep_input: bool = True,
               drop: Sequence[str] = ("hidden_states",)) -> "BlockCall":
        """The call ``module(*args, **kwargs)`` on ``device``, without the keyword arguments in ``drop``."""
        by_keyword = not args
        hidden = kwargs["hidden_states"] if by_keyword else args[0]
        rest = {k: v for k, v in kwargs.items() if k not in drop and k != "hidden_states"}
        return cls(to_device(tuple(args[1:]), device, memo), to_device(rest, device, memo),
                   to_device(hidden, device, memo) if keep_input else None, by_keyword)

    def run(self, module: nn.Module, device, x: torch.Tensor | None = None) -> torch.Tensor:
        """``module``'s output (the first element when it returns a tuple) on this call's arguments, on
        ``device``; ``x`` is the input (default: the recorded one)."""
        memo: dict = {}
        args, kwargs = to_device(self.args, device, memo), to_device(self.kwargs, device, memo)
        x = (self.input if x is None else x).to(device)
        out = module(hidden_states=x, **kwargs) if self.by_keyword else module(x, *args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


@dataclass
class SampleRecord:
    """One calibration sample as the stack sees it."""

    hidden: torch.Tensor  # block 0's input [..., D]
    calls: list[BlockCall]  # per block: the arguments the model passes it (input left out)
    masks: dict[str, torch.Tensor]  # modality -> bool [1, T] (empty outside the decoder)
    between: Any = None  # the state of the stack's between-block step


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


def _passthrough(hidden_states, *args, **kwargs):
    return hidden_states


@contextmanager
def _blocks_passthrough(blocks: Sequence[nn.Module]):
    for block in blocks:
        block.forward = _passthrough  # instance attribute: hooks still run, the block's compute does not
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


@torch.no_grad()
def capture_stack_inputs(model: nn.Module, stack: BlockStack, batches: list[dict], device, offload: str = "cpu",
                         desc: str | None = None) -> CapturedInputs:
    """Per batch: block 0's input, each block's own arguments and the between-block state (see the module doc)."""
    blocks = list(stack.blocks)
    record: dict = {}

    def block_hook(idx):
        def hook(module, args, kwargs):
            if record["calls"][idx] is not None:
                raise RuntimeError(f"{type(model).__name__}: block {idx} of the {stack.name} stack was called twice in "
                                   "one forward; the adapter does not describe this model's loop over its blocks")
            hidden = args[0] if args else kwargs["hidden_states"]
            record["shapes"].add(tuple(hidden.shape))
            if idx == 0:
                record["hidden"] = hidden
            # the blocks are pass-throughs: every block gets the same input (stored once, as block 0's)
            record["calls"][idx] = (tuple(args), dict(kwargs))
        return hook

    def entry_hook(module, args, kwargs):
        record["between"] = stack.between_state(kwargs)

    def stop(module, args):
        raise _StopForward

    handles = [b.register_forward_pre_hook(block_hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    if stack.entry is not None and stack.between_state is not None:
        handles.append(stack.entry.register_forward_pre_hook(entry_hook, with_kwargs=True))
    handles.append(stack.exit.register_forward_pre_hook(stop))
    captured = CapturedInputs(offload=offload)
    try:
        with _blocks_passthrough(blocks):
            for batch in tqdm(batches, desc=desc or f"capture {stack.name} inputs", leave=False):
                record.update(calls=[None] * len(blocks), shapes=set(), hidden=None, between=None)
                batch = to_device(batch, device)
                try:
                    model(**batch, use_cache=False)
                except _StopForward:
                    pass
                called = sum(c is not None for c in record["calls"])
                if called == 0 and not stack.every_batch:
                    continue  # this batch has no input for the stack (no image)
                if called != len(blocks) or len(record["shapes"]) != 1:
                    raise RuntimeError(
                        f"{type(model).__name__}: capturing the {stack.name} stack's inputs saw {called} of "
                        f"{len(blocks)} blocks called, with input shapes {sorted(record['shapes'])}; the adapter "
                        "does not describe this model's loop over its blocks")
                memo: dict = {}
                calls = [BlockCall.record(args, kwargs, offload, memo, keep_input=False, drop=_DROP_KWARGS)
                         for args, kwargs in record["calls"]]
                masks = stack.masks(batch) if stack.masks is not None else {}
                captured.samples.append(SampleRecord(
                    to_device(record["hidden"], offload, memo), calls, to_device(masks, offload),
                    to_device(record["between"], offload, memo)))
    finally:
        for h in handles:
            h.remove()
    return captured


class InputObserver(Protocol):
    """Sees the input rows of one input group's linear: x [N, D] and the rows' modality masks {m: bool[N]}."""

    def observe(self, group: str, x: torch.Tensor, masks: dict[str, torch.Tensor]) -> None: ...


@contextmanager
def observing_linears(group_linears: dict[str, nn.Module], observers: Sequence[InputObserver], current: dict):
    """Forward pre-hooks on one linear per input group that pass its input rows to every observer;
    ``current["masks"]`` holds the rows' masks. A linear with an ``input_transform`` (an online Hadamard) is
    observed after it: observers see the rows its weight multiplies."""
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


@dataclass
class Sample:
    """One sample at the input of one block, on the compute device."""

    hidden: torch.Tensor
    call: BlockCall
    masks: dict[str, torch.Tensor]

    def run(self, block: nn.Module) -> torch.Tensor:
        """``block``'s output on this sample (with gradients when enabled)."""
        return self.call.run(block, self.hidden.device, self.hidden)


class StackStep:
    """One block during a walk; ``fp_outputs`` are its outputs as it was when the step began."""

    def __init__(self, walker: "StackWalker", index: int, block: nn.Module, device=None):
        self.walker = walker
        self.stack = walker.stack
        self.index = index
        self.block = block
        # where the block runs during this step (masquant.engine.placement.resident): the walk's compute device, or
        # the block's own GPU under a device map; per-block work (statistics, searches, learning) belongs there
        self.device = walker.device if device is None else torch.device(device)
        self.fp_outputs: list[torch.Tensor] | None = None
        self.stats = None  # the block's FP input statistics, when the walk was asked for them
        self._quant_outputs: list[torch.Tensor] | None = None

    @property
    def layer(self) -> nn.Module:
        """The block (a decoder layer, for the decoder stack)."""
        return self.block

    def linears(self, block: nn.Module | None = None) -> dict[str, nn.Module]:
        return self.stack.linears(self.block if block is None else block)

    @property
    def n_samples(self) -> int:
        return len(self.walker.captured)

    def masks(self, k: int) -> dict[str, torch.Tensor]:
        """Sample ``k``'s modality masks (on the offload device)."""
        return self.walker.captured.samples[k].masks

    def sample(self, stream: str, k: int) -> Sample:
        """Sample ``k`` at this block's input on the compute device; stream 'fp' or 'quant'."""
        rec = self.walker.captured.samples[k]
        memo: dict = {}
        call = rec.calls[self.index]
        call = BlockCall(to_device(call.args, self.device, memo), to_device(call.kwargs, self.device, memo),
                         None, call.by_keyword)
        return Sample(self.walker.stream(stream)[k].to(self.device), call, to_device(rec.masks, self.device))

    def run(self, stream: str = "fp", layer: nn.Module | None = None, observers: Sequence[InputObserver] = (),
            keep: bool = True, samples: Sequence[int] | None = None) -> list[torch.Tensor] | None:
        """Outputs of ``layer`` (default: this step's block as it is now) on the samples of ``stream`` (all, or
        the indices in ``samples``)."""
        block = self.block if layer is None else layer
        router = self.walker.router
        outputs = [] if keep else None
        current: dict = {}
        with torch.no_grad(), observing_linears(self.stack.input_group_linears(block), observers, current):
            for k in (range(self.n_samples) if samples is None else samples):
                s = self.sample(stream, k)
                current["masks"] = s.masks
                if router is not None:
                    router.set_masks(s.masks)
                y = s.run(block)
                if keep:
                    outputs.append(y.to(self.walker.captured.offload))
        return outputs

    def block_calls(self, module: nn.Module, stream: str = "fp") -> list[BlockCall]:
        """What ``module`` (a part of this block) receives, per sample, when the block as it is now runs on
        ``stream``: its arguments exactly as the block passes them (the attention's position embeddings and
        masks, the MLP's post-norm input), on the offload device. One pass of the block; the caller holds one
        part's inputs at a time, so memory stays at one stream's worth."""
        return self._record_module([module], stream, outputs=False)[0][0]

    def block_calls_and_outputs(self, module: nn.Module, stream: str = "fp"
                                ) -> tuple[list[BlockCall], list[torch.Tensor]]:
        """:meth:`block_calls` and, from the same pass, what ``module`` returned per sample (its first output, on
        the offload device): the part's targets without running it a second time."""
        return self.parts_calls_and_outputs([module], stream)[0]

    def parts_calls_and_outputs(self, modules: Sequence[nn.Module], stream: str = "fp"
                                ) -> list[tuple[list[BlockCall], list[torch.Tensor]]]:
        """:meth:`block_calls_and_outputs` of several parts of the block from one pass (their inputs and outputs
        are all held at once)."""
        return self._record_module(modules, stream, outputs=True)

    def _record_module(self, modules: Sequence[nn.Module], stream: str, outputs: bool):
        calls: list[list[BlockCall]] = [[] for _ in modules]
        outs: list[list[torch.Tensor]] = [[] for _ in modules]
        offload = self.walker.captured.offload

        def pre_hook(k):
            return lambda mod, args, kwargs: calls[k].append(BlockCall.record(args, kwargs, offload, {}))

        def hook(k):
            def record(mod, args, kwargs, out):
                y = out[0] if isinstance(out, tuple) else out
                outs[k].append(y.detach().to(offload, copy=True))  # a copy: the block may update it in place
            return record

        handles = []
        for k, module in enumerate(modules):
            handles.append(module.register_forward_pre_hook(pre_hook(k), with_kwargs=True))
            if outputs:
                handles.append(module.register_forward_hook(hook(k), with_kwargs=True))
        try:
            self.run(stream, keep=False)
        finally:
            for h in handles:
                h.remove()
        for module, c in zip(modules, calls):
            if len(c) != self.n_samples:
                raise RuntimeError(f"{type(module).__name__} was called {len(c)} times for {self.n_samples} samples; "
                                   "block_calls needs a module the block calls once per forward")
        return list(zip(calls, outs))

    def quant_outputs(self) -> list[torch.Tensor]:
        """Outputs of the block as it is now on the quantized stream (computed once; the walk advances with them).
        With the walker's ``quantized_activations=False`` its QuantLinears leave their inputs unquantized."""
        if self._quant_outputs is None:
            with nullcontext() if self.walker.quantized_activations else activations_unquantized(self.block):
                self._quant_outputs = self.run("quant")
        return self._quant_outputs


class StackWalker:
    """Iterate :class:`StackStep` s over a stack, reproducing the model's forward block by block.

    ``quantized_stream``: also keep a second stream fed by the blocks as the caller leaves them (each block sees
    the previous quantized blocks' outputs, as GPTQ and block-wise learning need); ``quantized_activations=False``:
    that stream runs the deployed blocks with unquantized activations (weights only: official GPTQ's stream).
    ``fp_observers(step)``: observers of the FP pass of each block (running statistics, Gram matrices).
    ``router``: the modality router of the model's QuantLinears; its masks are set for every sample.
    ``last``: stop after this block index.
    """

    def __init__(self, stack: BlockStack, captured: CapturedInputs, device, *, quantized_stream: bool = False,
                 fp_stream: bool = True, router=None,
                 fp_observers: Callable[[StackStep], Sequence[InputObserver]] | None = None,
                 desc: str | None = None, last: int | None = None, quantized_activations: bool = True):
        if not (fp_stream or quantized_stream):
            raise ValueError("a walk needs at least one stream (fp_stream or quantized_stream)")
        self.stack = stack
        self.captured = captured
        self.device = torch.device(device)
        self.router = router
        self.quantized_activations = quantized_activations
        self.fp_observers = fp_observers
        self.desc = desc or stack.name
        start = [s.hidden for s in captured.samples]
        self._fp = start if fp_stream else None
        self._q = list(start) if quantized_stream else None
        self.last = last

    def stream(self, name: str) -> list[torch.Tensor]:
        if name == "fp":
            if self._fp is None:
                raise ValueError("this walk has no FP stream (StackWalker(..., fp_stream=False))")
            return self._fp
        if name == "quant":
            if self._q is None:
                raise ValueError("this walk has no quantized stream (StackWalker(..., quantized_stream=True))")
            return self._q
        raise ValueError(f"stream={name!r}: valid streams are 'fp' and 'quant'")

    def _after(self, idx: int, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        if self.stack.after_block is None:
            return outputs
        out = []
        for rec, h in zip(self.captured.samples, outputs):
            state = None if rec.between is None else to_device(rec.between, h.device)
            out.append(self.stack.after_block(idx, h, state))
        return out

    def __iter__(self) -> Iterator[StackStep]:
        blocks = self.stack.blocks
        last = len(blocks) - 1 if self.last is None else self.last
        for i in tqdm(range(last + 1), desc=self.desc, leave=False):
            with resident(blocks[i], self.device) as device:  # one block on the compute device at a time
                step = StackStep(self, i, blocks[i], device)
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
        """The streams after the last walked block (before the stack's exit)."""
        return self.stream(stream)
