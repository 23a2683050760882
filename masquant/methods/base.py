"""The method plugin interface. Every method (ours and the baselines) has this shape.

- ``<Name>Config``: typed dataclass; ``@register_method("<id>", config=<Name>Config)`` on the class
  registers both (the config becomes the Hydra schema ``method/<id>_schema``).
- ``check(scheme, modalities)``: refuse what the method cannot do, before any expensive work;
  ``check_adapter(adapter_cls)``: the same for a model family, before the model is loaded.
- ``transform_model_(ctx)``: whole-model, function-preserving transforms before calibration capture
  (rotations, norm fusion); returns a dict that identifies the transform (part of the statistics cache
  key), or None for no transform.
- ``collect(ctx)``: statistics needed before ``apply`` (``ctx.input_stats()``: cached), or None.
- ``apply(ctx, stats)``: walk the layers (``ctx.walk(...)``), transform, deploy through
  ``quantize_layer_``; returns a report dict written with the results.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import torch
import torch.nn as nn

from masquant.calibration.cache import StatsCache
from masquant.calibration.data import CalibrationSet
from masquant.calibration.stats import LayerStats, RunningInputStats, stats_from_state, stats_to_state
from masquant.calibration.walker import CapturedInputs, InputObserver, LayerStep, LayerWalker
from masquant.quant.linear import ModalityPath, ModalityRouter, QuantLinear
from masquant.quant.quantizer import quantize_weight
from masquant.quant.scheme import QuantScheme

log = logging.getLogger(__name__)


class MethodConfigError(ValueError):
    """A method was asked for something it cannot do (raised before calibration)."""


@dataclass
class QuantContext:
    """Everything a method may use; methods never see file paths or model names."""

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
    report: dict = field(default_factory=dict)

    def _require_calib(self) -> CalibrationSet:
        if self.calib is None or len(self.calib) == 0:
            raise MethodConfigError("this method needs calibration data (calib.n_samples > 0)")
        return self.calib

    def captured(self) -> CapturedInputs:
        """Decoder inputs of the calibration prompts (captured once per model state)."""
        return self._require_calib().capture(self.model, self.adapter, self.device, self.offload, self.video_as)

    def stats_key(self) -> dict:
        return {**self.cache_key, "kind": "input_stats", "modalities": list(self.modalities)}

    def walk(self, *, quantized_stream: bool = False, fp_stream: bool = True, stats: bool = False,
             fp_observers: Callable[[LayerStep], list[InputObserver]] | None = None,
             desc: str = "layers") -> Iterator[LayerStep]:
        """The layer walker over the calibration set, with the model's router.

        ``stats=True`` puts each layer's FP input statistics (:class:`LayerStats`) in ``step.stats``: from
        the cache, or observed in the FP pass the walk makes anyway (then cached when the walk ends).
        """
        cached = None
        if stats:
            state = self.cache.load(self.stats_key())
            cached = None if state is None else stats_from_state(state)
            if cached is None and not fp_stream:
                cached = self.input_stats()
        computed: list[RunningInputStats] = []

        def observers(step: LayerStep) -> list[InputObserver]:
            obs = list(fp_observers(step)) if fp_observers is not None else []
            if stats and cached is None:
                computed.append(RunningInputStats.for_layer(self.adapter, step.layer, self.modalities))
                obs.append(computed[-1])
            return obs

        walker = LayerWalker(self.adapter, self.captured(), self.device, quantized_stream=quantized_stream,
                             fp_stream=fp_stream, router=self.router, fp_observers=observers, desc=desc)
        for step in walker:
            if stats:
                step.stats = cached[step.index] if cached is not None else computed[step.index].stats
            yield step
        if stats and cached is None:
            self.cache.save(self.stats_key(), stats_to_state([c.stats for c in computed]))

    def input_stats(self) -> list[LayerStats]:
        """Per-layer, per-input-group, per-modality running statistics of the FP model (cached)."""
        state = self.cache.load(self.stats_key())
        if state is not None:
            return stats_from_state(state)
        out = [step.stats for step in self.walk(stats=True, desc="calibration statistics")]
        return out


class Method(ABC):
    id: ClassVar[str]
    needs_calibration: ClassVar[bool] = True
    needs_answers: ClassVar[bool] = False  # True: calibration rows must carry answers (checked before loading)
    # True: a backward pass through the whole model (not only layer by layer); model.placement=offload refuses it
    needs_whole_model_backward: ClassVar[bool] = False
    # True when the method rounds its weights through masquant.methods.weights (quant.w_quantizer=gptq,
    # quant.w_mse_clip); the others round to nearest and refuse those options (check_weight_options).
    honours_weight_options: ClassVar[bool] = False

    def __init__(self, cfg: Any = None):
        self.cfg = cfg

    def requires_calibration(self, scheme: QuantScheme) -> bool:
        """Calibration data needed for this scheme: the method's own need, or GPTQ's Hessians."""
        return self.needs_calibration or (self.honours_weight_options and scheme.w_quantizer == "gptq")

    def check_weight_options(self, scheme: QuantScheme) -> None:
        """Refuse weight-rounding options the method would silently ignore."""
        if self.honours_weight_options or scheme.default_weight_rounding:
            return
        from masquant.registry import get_method_class, method_ids

        honour = [m for m in method_ids() if get_method_class(m).honours_weight_options]
        asked = "quant.w_quantizer=gptq" if scheme.w_quantizer == "gptq" else "quant.w_mse_clip=true"
        raise MethodConfigError(f"method={self.id} rounds its weights to nearest and does not honour {asked}; "
                                f"methods that do: {honour}")

    def check(self, scheme: QuantScheme, modalities: tuple[str, ...]) -> None:
        """Raise MethodConfigError for an unsupported scheme/modality set. Default: accept all."""

    def check_adapter(self, adapter_cls: type) -> None:
        """Raise MethodConfigError for a model family (adapter class) the method cannot handle, before the model
        is loaded (what only the loaded model shows is refused in ``transform_model_``). Default: accept all."""

    def transform_model_(self, ctx: QuantContext) -> dict | None:
        """Whole-model transform before calibration capture; returns its identity (cache key) or None."""
        return None

    def collect(self, ctx: QuantContext) -> Any:
        return None

    @abstractmethod
    def apply(self, ctx: QuantContext, stats: Any) -> dict:
        ...

    def run(self, ctx: QuantContext) -> dict:
        self.check_weight_options(ctx.scheme)
        t0 = time.perf_counter()
        transform = self.transform_model_(ctx)
        if transform is not None:
            ctx.cache_key = {**ctx.cache_key, "transform": transform}
            if ctx.calib is not None:
                ctx.calib.invalidate()
        t1 = time.perf_counter()
        stats = self.collect(ctx)
        t2 = time.perf_counter()
        report = self.apply(ctx, stats) or {}
        t3 = time.perf_counter()
        report.update({"time/transform_s": t1 - t0, "time/collect_s": t2 - t1, "time/apply_s": t3 - t2})
        return report


@dataclass
class DeployWeight:
    """The weight a linear deploys: FP (quantized by the scheme at deploy) or already quantized (e.g. GPTQ)."""

    W: torch.Tensor  # [out, in]
    quantized: bool = False


WeightFn = Callable[[str, nn.Module], "DeployWeight | torch.Tensor"]
PathsFn = Callable[[str, nn.Module, torch.Tensor], "dict[str, ModalityPath]"]


@torch.no_grad()
def quantize_layer_(ctx: QuantContext, layer: nn.Module, weight_for: WeightFn | None = None,
                    paths_for: PathsFn | None = None, input_transform_for=None) -> int:
    """The one deploy path: replace the layer's decoder linears by :class:`QuantLinear` s.

    ``weight_for(role, linear)`` gives the shared weight (default: the linear's own, quantized by the
    scheme; a :class:`DeployWeight` with ``quantized=True`` is used as is). ``paths_for(role, linear, W_q)``
    adds per-modality :class:`ModalityPath` s. ``input_transform_for(role, linear)`` gives a module applied
    to the input before activation quantization (an online Hadamard); by default a linear keeps its own
    ``input_transform`` (a rotated model's online Hadamard, whose other half is folded into the weight).
    Returns the number of linears.
    """
    n = 0
    for role, linear in ctx.adapter.linears(layer).items():
        spec = weight_for(role, linear) if weight_for is not None else None
        if spec is None:
            spec = DeployWeight(linear.weight.data)
        elif torch.is_tensor(spec):
            spec = DeployWeight(spec)
        dtype = linear.weight.dtype
        W_q = spec.W if spec.quantized else quantize_weight(spec.W.float(), ctx.scheme)
        W_q = W_q.to(dtype)
        paths = paths_for(role, linear, W_q) if paths_for is not None else {}
        if input_transform_for is not None:
            transform = input_transform_for(role, linear)
        else:
            transform = getattr(linear, "input_transform", None)
        bias = None if linear.bias is None else linear.bias.data
        ctx.adapter.set_linear(layer, role, QuantLinear(W_q, bias, ctx.scheme, ctx.router, paths, transform))
        n += 1
    return n


def quantize_decoder_linears_(ctx: QuantContext, weight_for=None, paths_for=None, desc: str = "quantize") -> int:
    """:func:`quantize_layer_` on every decoder layer (``weight_for`` / ``paths_for`` take the layer index first)."""
    from tqdm.auto import tqdm

    n = 0
    for i, layer in enumerate(tqdm(ctx.adapter.decoder_layers(), desc=desc, leave=False)):
        n += quantize_layer_(ctx, layer,
                             None if weight_for is None else (lambda role, lin, i=i: weight_for(i, role, lin)),
                             None if paths_for is None else (lambda role, lin, Wq, i=i: paths_for(i, role, lin, Wq)))
    return n


__all__ = ["Method", "MethodConfigError", "QuantContext", "DeployWeight", "quantize_layer_",
           "quantize_decoder_linears_", "ModalityPath"]
