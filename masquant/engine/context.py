"""What a method sees of a run: the model and its adapter, the scheme, the calibration set, the statistics cache,
and the walks over the model's stacks of blocks. Methods never see file paths or model names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn as nn

from masquant.adapters.stack import BlockStack
from masquant.calibration.cache import StatsCache
from masquant.calibration.data import CalibrationSet
from masquant.calibration.stats import LayerStats, RunningInputStats, stats_from_state, stats_to_state
from masquant.engine.walker import CapturedInputs, InputObserver, StackStep, StackWalker, capture_stack_inputs
from masquant.errors import MethodConfigError
from masquant.quant.linear import ModalityRouter
from masquant.quant.scheme import QuantScheme

DECODER = "decoder"


@dataclass
class QuantContext:
    """Everything a method may use while it quantizes one model."""

    model: nn.Module
    adapter: Any
    scheme: QuantScheme
    router: ModalityRouter
    device: torch.device
    modalities: tuple[str, ...]
    calib: CalibrationSet | None = None
    cache: StatsCache = field(default_factory=lambda: StatsCache(None))
    cache_key: dict = field(default_factory=dict)  # identifies model + calibration set (+ transform)
    video_as: str = "vision"
    offload: str = "cpu"
    _captured: dict[str, CapturedInputs] = field(default_factory=dict, init=False, repr=False)

    def stack(self, name: str = DECODER) -> BlockStack:
        """The model's stack called ``name`` ("decoder", "vision"), as the adapter describes it."""
        return self.adapter.stack(name, self.video_as)

    def require_calibration(self) -> CalibrationSet:
        if self.calib is None or len(self.calib) == 0:
            raise MethodConfigError("this method needs calibration data (calib.n_samples > 0)")
        return self.calib

    def captured(self, stack: str = DECODER) -> CapturedInputs:
        """The inputs of ``stack``'s blocks on the calibration prompts (captured once per model state)."""
        if stack not in self._captured:
            captured = capture_stack_inputs(self.model, self.stack(stack), self.require_calibration().batches,
                                            self.device, self.offload)
            if not len(captured):
                raise MethodConfigError(f"no calibration prompt reached the model's {stack} stack (a {stack} stack "
                                        "needs calibration rows with its input, e.g. images for the vision encoder)")
            self._captured[stack] = captured
        return self._captured[stack]

    def invalidate(self) -> None:
        """Forget the captured inputs: the model changed before the stacks they feed (a transform, a quantized
        encoder), so the next walk captures them again."""
        self._captured.clear()

    def stats_modalities(self, stack: BlockStack) -> tuple[str, ...]:
        """The modalities a stack's statistics are kept for, besides "all" (none outside the routed decoder)."""
        return self.modalities if stack.routed else ()

    def stats_key(self, stack: str = DECODER) -> dict:
        key = {**self.cache_key, "kind": "input_stats",
               "modalities": list(self.stats_modalities(self.stack(stack)))}
        return key if stack == DECODER else {**key, "stack": stack}

    def walk(self, stack: str = DECODER, *, quantized_stream: bool = False, fp_stream: bool = True,
             stats: bool = False, fp_observers: Callable[[StackStep], list[InputObserver]] | None = None,
             desc: str | None = None, quantized_activations: bool = True) -> Iterator[StackStep]:
        """The walker over ``stack``'s blocks on the calibration set, with the model's router.

        ``stats=True`` puts each block's FP input statistics (:class:`LayerStats`) in ``step.stats``: from the
        cache, or observed in the FP pass the walk makes anyway (then cached when the walk ends).
        """
        blocks = self.stack(stack)
        modalities = self.stats_modalities(blocks)
        cached = None
        if stats:
            state = self.cache.load(self.stats_key(stack))
            cached = None if state is None else stats_from_state(state)
            if cached is None and not fp_stream:
                cached = self.input_stats(stack)
        computed: list[RunningInputStats] = []

        def observers(step: StackStep) -> list[InputObserver]:
            obs = list(fp_observers(step)) if fp_observers is not None else []
            if stats and cached is None:
                computed.append(RunningInputStats.for_block(blocks, step.block, modalities))
                obs.append(computed[-1])
            return obs

        walker = StackWalker(blocks, self.captured(stack), self.device, quantized_stream=quantized_stream,
                             fp_stream=fp_stream, router=self.router if blocks.routed else None,
                             fp_observers=observers, desc=desc, quantized_activations=quantized_activations)
        for step in walker:
            if stats:
                step.stats = cached[step.index] if cached is not None else computed[step.index].stats
            yield step
        if stats and cached is None:
            self.cache.save(self.stats_key(stack), stats_to_state([c.stats for c in computed]))

    def input_stats(self, stack: str = DECODER) -> list[LayerStats]:
        """Per-block, per-input-group, per-modality running statistics of the FP model (cached)."""
        state = self.cache.load(self.stats_key(stack))
        if state is not None:
            return stats_from_state(state)
        return [step.stats for step in self.walk(stack, stats=True, desc="calibration statistics")]
