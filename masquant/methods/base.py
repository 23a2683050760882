"""The method plugin interface. Every method (ours and the baselines) has this shape; the engine
(:mod:`masquant.engine.engine`) owns the loop over the model's blocks and calls the hooks below.

- ``<Name>Config``: a typed dataclass, the one source of the method's defaults;
  ``@register_method("<id>", config=<Name>Config, order=...)`` on the class registers both (the config becomes
  the Hydra config ``method=<id>``; ``order`` places the method in tables).
- Capability flags (class attributes): what the method needs and which schemes it takes. :meth:`check` turns them
  into clear errors before anything loads; a method adds its own refusals in :meth:`check_config` and, for a
  model family, :meth:`check_adapter`.
- Hooks, in the order the engine calls them: :meth:`transform_model_` (whole-model, function-preserving
  transforms such as rotations), :meth:`prepare` (whole-model work before the walk, e.g. gradients), then per
  stack (:meth:`stacks`) and block: :meth:`walk` (what the method needs from the walk), :meth:`observers` (extra
  observers of the block's FP pass), :meth:`plan_block` (the maths: what the block deploys),
  :meth:`after_deploy` (measurements on the deployed block), and finally :meth:`finish`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from masquant.engine.engine import BlockPlan, Walk
from masquant.errors import MethodConfigError
from masquant.quant.scheme import QuantScheme

FP16 = ("refused", "allowed", "required")  # quant=fp16: quantizes nothing / a valid scheme / the only scheme
ACTIVATIONS = ("optional", "required", "refused")  # activation quantization: either / needed / weight-only
ACTIVATION_SCALES = ("dynamic", "static", "either")  # quantized activations: per-token dynamic, static per tensor

__all__ = ["Method", "MethodConfigError", "BlockPlan", "Walk"]


class Method(ABC):
    id: ClassVar[str]
    config_class: ClassVar[type]
    order: ClassVar[int] = 100  # place in tables (set by register_method)

    # --- capability flags ---------------------------------------------------------------------------------
    needs_calibration: ClassVar[bool] = True  # calibration prompts (else only with quant.w_quantizer=gptq)
    needs_answers: ClassVar[bool] = False  # calibration rows must carry answers (checked before loading)
    # a backward pass through the whole model (not only block by block); model.placement=offload refuses it
    needs_whole_model_backward: ClassVar[bool] = False
    # weights rounded through masquant.engine.weights (quant.w_quantizer=gptq, quant.w_mse_clip); the others round
    # to nearest and refuse those options
    honours_weight_options: ClassVar[bool] = False
    fp16: ClassVar[str] = "refused"  # one of FP16
    activations: ClassVar[str] = "optional"  # one of ACTIVATIONS
    activation_scales: ClassVar[str] = "dynamic"  # one of ACTIVATION_SCALES
    dynamic_only_reason: ClassVar[str] = ""  # why static activation scales are refused (the error says it)
    # the transforms alone (quant=fp16) leave the model's function unchanged: folds, rotations, smoothing paths;
    # False for a method that changes the function by design (sparsity, a low-rank approximation)
    function_preserving: ClassVar[bool] = True
    # the method returns the model exactly as loaded (the dense reference): the run reports SQNR +inf and
    # perplexity = FP perplexity without measuring them twice
    leaves_model_unchanged: ClassVar[bool] = False
    # why the method's model cannot be written as a compressed-tensors checkpoint (export=compressed_tensors is
    # refused before anything loads); "" = exportable (what the model shows is checked again at export)
    export_refusal: ClassVar[str] = ""

    def __init__(self, cfg: Any = None):
        self.cfg = cfg if cfg is not None else self.config_class()

    def export_problem(self) -> str:
        """Why this method, with its options, cannot be exported (checked before loading); "" when it can."""
        return self.export_refusal

    # --- checks, before anything loads ----------------------------------------------------------------------
    def requires_calibration(self, scheme: QuantScheme) -> bool:
        """Calibration data needed for this scheme: the method's own need, or GPTQ's Hessians."""
        return self.needs_calibration or (self.honours_weight_options and scheme.w_quantizer == "gptq")

    def accepts_fp16(self) -> bool:
        """quant=fp16 is a valid scheme for this configuration of the method."""
        return self.fp16 != "refused"

    def check_weight_options(self, scheme: QuantScheme) -> None:
        """Refuse weight-rounding options the method would silently ignore."""
        if self.honours_weight_options or scheme.default_weight_rounding:
            return
        asked = "quant.w_quantizer=gptq" if scheme.w_quantizer == "gptq" else "quant.w_mse_clip=true"
        raise MethodConfigError(f"method={self.id} rounds its weights to nearest and does not honour {asked}; "
                                f"methods that do: {_methods_where(lambda m: m.honours_weight_options)}")

    def check(self, scheme: QuantScheme, modalities: tuple[str, ...]) -> None:
        """Raise MethodConfigError for a scheme or modality set the method cannot do: the capability flags, then
        :meth:`check_config`."""
        name = scheme.name
        if self.fp16 == "required" and not scheme.is_dense:
            raise MethodConfigError(f"method={self.id} runs the unquantized model but quant={name} quantizes; "
                                    "use quant=fp16")
        if scheme.is_dense and not self.accepts_fp16():
            raise MethodConfigError(f"method={self.id} with quant={name} quantizes nothing; use method=dense")
        if self.activations == "required" and not scheme.quantize_acts and not scheme.is_dense:
            raise MethodConfigError(
                f"method={self.id} quantizes activations, but quant={name} is weight-only (a_bits=16): use a "
                f"weight-activation scheme (e.g. quant=w8a8, quant=w4a8), or a method for weight-only schemes: "
                f"{_methods_where(lambda m: m.activations != 'required' and m.fp16 != 'required')}")
        if self.activations == "refused" and scheme.quantize_acts:
            raise MethodConfigError(
                f"method={self.id} is weight-only, but quant={name} quantizes activations (a_bits={scheme.a_bits}): "
                f"use a weight-only scheme (e.g. quant=w4a16_g128, quant=w3a16_g128), or a method for "
                f"weight-activation schemes: {_methods_where(lambda m: m.activations != 'refused' and m.fp16 != 'required')}")
        if scheme.quantize_acts:
            static = not scheme.a_dynamic
            if self.activation_scales == "dynamic" and static:
                why = f" ({self.dynamic_only_reason})" if self.dynamic_only_reason else ""
                raise MethodConfigError(
                    f"method={self.id} deploys dynamic activation scales{why}; quant={name} asks for static ones "
                    f"(quant.a_dynamic=false): use quant.a_dynamic=true, or a method with static scales: "
                    f"{_methods_where(lambda m: m.activation_scales != 'dynamic')}")
            if self.activation_scales == "static" and scheme.a_format == "mxfp4":
                raise MethodConfigError(f"method={self.id} deploys static per-tensor activation scales; quant={name} "
                                        "has quant.a_format=mxfp4, whose block scales come from each input: use "
                                        "quant.a_format=fp8_e4m3 or nvfp4 (with quant.a_dynamic=false "
                                        "quant.a_granularity=tensor), or int")
            if self.activation_scales == "static" and (scheme.a_dynamic or scheme.a_granularity != "tensor"
                                                       or not scheme.a_symmetric):
                raise MethodConfigError(f"method={self.id} deploys static symmetric per-tensor activation scales: add "
                                        "quant.a_dynamic=false quant.a_granularity=tensor (and quant.a_symmetric=true)")
        self.check_config(scheme, modalities)

    def check_config(self, scheme: QuantScheme, modalities: tuple[str, ...]) -> None:
        """The method's own refusals (an option against the scheme or the modalities). Default: none."""

    def check_adapter(self, adapter_cls: type) -> None:
        """Raise MethodConfigError for a model family (adapter class) the method cannot handle, before the model
        is loaded (what only the loaded model shows is refused in ``transform_model_``). Default: accept all."""

    # --- hooks the engine calls -------------------------------------------------------------------------------
    def transform_model_(self, ctx) -> dict | None:
        """Whole-model, function-preserving transform before calibration capture; returns its identity (part of
        the statistics cache key) or None for no transform."""
        return None

    def prepare(self, ctx):
        """Whole-model work before the walk (e.g. gradients); may return the context the walk uses instead of
        ``ctx`` (e.g. over other calibration sequences), or None."""
        return None

    def stacks(self, ctx) -> tuple[str, ...]:
        """The stacks of blocks to quantize, in order (the engine walks each): by default the decoder."""
        return ("decoder",)

    def walk(self, ctx, stack) -> Walk | None:
        """What the method needs from the walk over ``stack``; None: the blocks are visited without calibration
        data (round to nearest)."""
        return Walk(stats=True)

    def observers(self, ctx, step) -> list:
        """Extra observers of the block's FP pass (e.g. Gram matrices); they see its linears' inputs."""
        return []

    @abstractmethod
    def plan_block(self, ctx, step) -> BlockPlan:
        """The method's maths on one block: transform it in place (folds), and say what it deploys."""

    def after_deploy(self, ctx, step, plan: BlockPlan) -> dict:
        """Report entries measured on the deployed block (``step.quant_outputs()`` is computed once and reused by
        the walk); keys as in ``BlockPlan.report``."""
        return {}

    def finish(self, ctx) -> dict:
        """After every stack: whole-model steps and report entries (full keys, e.g. ``mquant/aifs``)."""
        return {}

    def run(self, ctx) -> dict:
        """Quantize ``ctx.model`` in place (the engine's loop with this method's hooks); returns the report."""
        from masquant.engine.engine import quantize_model_

        return quantize_model_(self, ctx)


def _methods_where(predicate) -> list[str]:
    from masquant.methods.registry import get_method_class, method_ids

    return [m for m in method_ids() if predicate(get_method_class(m))]
