"""MQuant (arXiv 2502.00425; code github StiphyJay/MQuant): QuaRot + GPTQ with full static activations.

``transform_model_``: QuaRot's rotations (:func:`masquant.transforms.rotation.rotate_model_`, online Hadamard
on down_proj). ``apply`` walks the layers with the FP statistics and the quantized stream; per layer:

- weights as ``quant.w_quantizer`` says (the paper's setting: ``quant.w_quantizer=gptq``);
- every activation quantization point (the input of q/k/v, o, gate/up, down) gets static per-tensor scales
  from the calibration set: with ``msq`` one per modality (text, vision, audio), deployed as per-modality
  :class:`ModalityPath` s, the router sending each token to its modality's scale (decode tokens are text);
  without it one scale for all tokens;
- ``rms``: points whose channel 0 is an outlier (:func:`baselines.mquant.core.channel0_outlier` on the FP
  statistics) split it into a rank-1 FP product (the path's low-rank branch x_0 · W[:, 0]ᵀ); the weight's
  column 0 is zeroed before rounding and the scale ignores channel 0;
- ``aifs``: after deployment, prefill runs visual tokens first in every layer (:mod:`baselines.mquant.aifs`).
  Under per-token routing the scales already follow the tokens, so AIFS changes no number here (the tests
  check it): it is the deployment order that lets a kernel use one scale per contiguous block.

Static scales need ``quant.a_dynamic=false quant.a_granularity=tensor`` (the scheme says what is deployed).

``scales`` says where the static scales come from: ``fp_prompts`` (the default) takes them from the FP model's
statistics over the calibration prompts, in the walk; ``generation`` (the official code's, and its
``recipe=official`` preset) fixes them after every weight is quantized, from the weight-quantized model with its
activations unquantized, over the prompts and the ``scale_new_tokens`` tokens (20) it generates greedily from each
(:mod:`baselines.mquant.calibrate`; decoded tokens are text tokens). The official recipe also runs GPTQ
true-sequential, with act-order and the MSE weight clip (``recipe=official`` sets them).

``vision_rms`` (with ``quantize_vision``; official ``--visual_split``): RMS on the encoder MLP's output linear
(fc2) in every block, unconditionally, as the released code splits it; our detector (``rms``) only looks at the
language model's points.
Where the released code differs, this follows the paper: MSQ is implemented (the code keeps one scale
for all tokens) and calibration uses the run's calibration set, never an evaluation benchmark.

``quantize_vision`` (off by default: MASQuant's setting, the language model only): MQuant's own setting also
quantizes the vision encoder. ``transform_model_`` then gives the encoder its own rotation
(:func:`masquant.transforms.rotation.rotate_vision_encoder_`: LayerNorm → RMSNorm where the encoder has
LayerNorm, norm fusion, a random Hadamard of its width, a Hadamard per head between V and the attention's
output linear, an online Hadamard on the MLP's output linear: the steps of MQuant's released code), and
``apply`` quantizes the encoder's linears first (:mod:`baselines.mquant.vision`: the same weight rounding,
static per-tensor activations from the calibration images), so the language model's statistics and GPTQ see
the visual tokens the deployed encoder gives. Adapters that do not declare their encoder
(``ModelAdapter.vision_encoder``) are refused before anything is loaded.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum

import torch.nn as nn

from baselines.mquant.aifs import AIFS
from baselines.mquant.calibrate import ScaleObserver, observe_generation
from baselines.mquant.core import channel0_outlier, msq_scale, split_channel0
from baselines.quarot.method import refuse_unrotatable, rotate_or_refuse_
from masquant.adapters.base import INPUT_GROUPS, ROLE_TO_GROUP
from masquant.engine.weights import block_weights
from masquant.methods.base import BlockPlan, Method, MethodConfigError, Walk
from masquant.methods.registry import register_method
from masquant.quant.linear import DEFAULT_PATH, ModalityPath, QuantLinear
from masquant.transforms.rotation import RotationMode, rotate_vision_encoder_

log = logging.getLogger(__name__)


class ScaleSource(str, Enum):
    fp_prompts = "fp_prompts"  # the FP model's statistics over the calibration prompts (in the walk)
    generation = "generation"  # official: the weight-quantized model over the prompts and its generated tokens


@dataclass
class MQuantConfig:
    id: str = "mquant"
    msq: bool = True  # one static scale per modality (False: one for all tokens)
    aifs: bool = True  # prefill visual tokens first (function-preserving)
    rms: bool = True  # split channel-0 outliers of rotated inputs into an FP rank-1 product
    seed: int = 0  # random signs of the residual rotation
    rotation_mode: RotationMode = RotationMode.pad  # widths without a Hadamard matrix
    online_down: bool = True  # online Hadamard on down_proj's input
    quantize_vision: bool = False  # also quantize the vision encoder (MQuant's setting; off: MASQuant's)
    scales: ScaleSource = ScaleSource.fp_prompts  # where the static scales come from (official: generation)
    scale_new_tokens: int = 20  # scales=generation: tokens generated from each calibration prompt
    vision_rms: bool = False  # RMS on the encoder MLP's output linear in every block (official --visual_split)

    def __post_init__(self):
        if self.scale_new_tokens < 0:
            raise ValueError(f"method.scale_new_tokens={self.scale_new_tokens}: must be >= 0")


def group_scales(layer_stats, group: str, modalities, scheme, msq: bool, skip_channel0: bool) -> dict:
    """{path name: static scale} of one input group: per modality with calibration tokens (msq) or one for all."""
    per_m = layer_stats[group]
    kw = dict(bits=scheme.a_bits, clip_ratio=scheme.a_clip_ratio, int_range=scheme.int_range.value,
              skip_channel0=skip_channel0, a_format=scheme.a_format.value)
    if not msq:
        return {"text": msq_scale(per_m["all"].absmax, **kw)}
    scales = {}
    for m in modalities:
        if m in per_m and per_m[m].count > 0:
            scales[m] = msq_scale(per_m[m].absmax, **kw)
        elif m != "text":
            log.warning("MSQ: no calibration tokens of modality %r at %s; its tokens take the text scale", m, group)
    if "text" not in scales:  # every point needs the default path's scale
        scales["text"] = msq_scale(per_m["all"].absmax, **kw)
    return scales


@register_method("mquant", config=MQuantConfig, order=60)
class MQuant(Method):
    honours_weight_options = True
    activations = "required"
    activation_scales = "static"

    def check_config(self, scheme, modalities) -> None:
        if self.cfg.vision_rms and not self.cfg.quantize_vision:
            raise MethodConfigError("method.vision_rms=true splits the vision encoder's fc2 input, which only "
                                    "method.quantize_vision=true quantizes")
        if self.cfg.quantize_vision and "vision" not in modalities:
            raise MethodConfigError(f"method.quantize_vision=true calibrates the vision encoder on images; "
                                    f"modality.modalities={list(modalities)} has no vision")

    def check_adapter(self, adapter_cls) -> None:
        reason = adapter_cls.vision_encoder_missing() if self.cfg.quantize_vision else None
        if reason:
            raise MethodConfigError(f"method.quantize_vision=true needs the vision encoder's blocks: {reason}; "
                                    "quantize the language model only (method.quantize_vision=false)")
        refuse_unrotatable(self.id, adapter_cls)

    def transform_model_(self, ctx) -> dict:
        self.check_adapter(type(ctx.adapter))
        ident = rotate_or_refuse_(ctx.adapter, self.cfg.seed, self.cfg.rotation_mode, self.cfg.online_down, self.id)
        if self.cfg.quantize_vision:
            ident["vision"] = rotate_vision_encoder_(ctx.adapter, seed=self.cfg.seed, mode=self.cfg.rotation_mode,
                                                     online_mlp=self.cfg.online_down)
        return ident

    def prepare(self, ctx):
        self.split: list[str] = []
        self.ratios: dict[str, float] = {}
        self.vision: dict = {}

    def stacks(self, ctx) -> tuple[str, ...]:
        # the encoder first: the decoder calibrates on what the deployed encoder gives
        return ("vision", "decoder") if self.cfg.quantize_vision else ("decoder",)

    def walk(self, ctx, stack):
        if stack.name == "decoder":
            return Walk(stats=True, quantized_stream=True)
        return Walk(stats=True, quantized_stream=ctx.scheme.w_quantizer == "gptq")

    def plan_block(self, ctx, step) -> BlockPlan:
        return self.plan_decoder_layer(ctx, step) if step.stack.name == "decoder" else self.plan_encoder_block(ctx, step)

    def plan_encoder_block(self, ctx, step) -> BlockPlan:
        """An encoder block: weights as quant.w_quantizer says, one static per-tensor scale per input group from the
        FP stream's abs-max over the calibration images (the encoder has visual tokens only: no MSQ, no RMS)."""
        scheme = ctx.scheme
        scales = {group: msq_scale(step.stats[group]["all"].absmax, scheme.a_bits, scheme.a_clip_ratio,
                                   scheme.int_range.value, a_format=scheme.a_format.value)
                  for group in step.stack.input_groups}
        v = self.vision
        v["scales"] = v.get("scales", []) + [float(scales[step.stack.role_group[r]]) for r in step.linears()]
        v["images"] = step.n_samples
        v["patches"] = sum(int(r.hidden.shape[0]) for r in step.walker.captured.samples)

        split = set(ctx.adapter.vision_encoder.mlp_output) if self.cfg.vision_rms else set()
        for role in split:  # RMS (--visual_split): the scale leaves channel 0 out, a rank-1 FP product carries it
            group = step.stack.role_group[role]
            scales[group] = msq_scale(step.stats[group]["all"].absmax, scheme.a_bits, scheme.a_clip_ratio,
                                      scheme.int_range.value, skip_channel0=True, a_format=scheme.a_format.value)
        v["split"] = v.get("split", 0) + len(split)
        rest = {}

        def source(role, linear):
            if role not in split:
                return linear.weight.data
            rest[role] = split_channel0(linear.weight.data)
            return rest[role][0]

        def paths_for(role, linear, W_q):
            extra = {}
            if role in split:
                _, L1, L2 = rest[role] if role in rest else split_channel0(linear.weight.data)
                extra = {"L1": L1, "L2": L2}
            return {DEFAULT_PATH: ModalityPath(act_scale=scales[step.stack.role_group[role]].to(linear.weight.device),
                                               **extra)}

        gptq = scheme.w_quantizer == "gptq"
        return BlockPlan(weights=block_weights(ctx, step if gptq else None, step.block, stack=step.stack,
                                               weight_source=source if split else None),
                         paths_for=paths_for)

    def export_problem(self) -> str:
        if self.cfg.online_down:
            return ("its online Hadamard on down_proj's input runs at inference, and masquant does not write "
                    "compressed-tensors' transform config (method.online_down=false drops it)")
        return ""

    def plan_decoder_layer(self, ctx, step) -> BlockPlan:
        """A decoder layer: MSQ scales per modality, RMS where channel 0 is an outlier, weights as
        quant.w_quantizer says (GPTQ on the quantized stream)."""
        cfg, scheme = self.cfg, ctx.scheme
        groups = {}
        for group in INPUT_GROUPS:
            affected, self.ratios[f"{group}/layer_{step.index}"] = channel0_outlier(step.stats[group]["all"].mean_abs)
            groups[group] = cfg.rms and affected
        self.split += [f"{group}/layer_{step.index}" for group, s in groups.items() if s]
        rest = {}

        def source(role, linear):
            if not groups[ROLE_TO_GROUP[role]]:
                return linear.weight.data
            rest[role] = split_channel0(linear.weight.data)
            return rest[role][0]

        weights = block_weights(ctx, step, weight_source=source if any(groups.values()) else None)

        def paths_for(role, linear, W_q, stats=step.stats):
            group = ROLE_TO_GROUP[role]
            scales = group_scales(stats, group, ctx.modalities, scheme, cfg.msq, groups[group])
            extra = {}
            if groups[group]:
                _, L1, L2 = rest[role] if role in rest else split_channel0(linear.weight.data)
                extra = {"L1": L1, "L2": L2}
            return {m: ModalityPath(act_scale=s.to(W_q.device), **extra) for m, s in scales.items()}

        return BlockPlan(weights=weights, paths_for=paths_for)

    def deployed_linears(self, ctx) -> dict[str, nn.Module]:
        """{"<role>/layer_<i>": QuantLinear} of the deployed decoder, and {"vision_<role>/block_<i>": ...} of the
        deployed encoder."""
        adapter = ctx.adapter
        found = {f"{role}/layer_{i}": lin for i, layer in enumerate(adapter.decoder_layers())
                 for role, lin in adapter.linears(layer).items()}
        if self.cfg.quantize_vision:
            found.update({f"vision_{role}/block_{i}": lin for i, block in enumerate(adapter.vision_blocks())
                          for role, lin in adapter.vision_linears(block).items()})
        return {name: lin for name, lin in found.items() if isinstance(lin, QuantLinear)}

    def calibrate_scales_by_generation(self, ctx) -> dict:
        """The official calibration (module docstring): every deployed path's static scale (the decoder's per
        modality, the encoder's one) from the weight-quantized model over the calibration prompts and its generated
        tokens. Returns report entries."""
        scheme, cfg = ctx.scheme, self.cfg
        linears = self.deployed_linears(ctx)
        observer = ScaleObserver(linears, ctx.router)
        try:
            observe_generation(ctx.model, ctx.require_calibration().batches, observer, cfg.scale_new_tokens, ctx.device)
        finally:
            observer.remove()
        kw = dict(bits=scheme.a_bits, clip_ratio=scheme.a_clip_ratio, int_range=scheme.int_range.value,
                  a_format=scheme.a_format.value)
        for name, linear in linears.items():
            seen = observer.absmax[name]
            for path_name, path in linear.paths.items():
                rows = seen.get(path_name if cfg.msq else "all")
                if rows is None:  # a modality the generation did not show (the walk gave it a path): all tokens
                    rows = seen["all"]
                scale = msq_scale(rows, skip_channel0=path.L1 is not None, **kw)
                path.act_scale = scale.to(device=path.act_scale.device, dtype=path.act_scale.dtype)
        tokens = observer.tokens
        return {"mquant/scales": "generation", "mquant/scale_new_tokens": cfg.scale_new_tokens,
                "mquant/scale_calib_tokens": tokens.get("all", 0),
                "mquant/scale_calib_text_tokens": tokens.get("text", 0)}

    def finish(self, ctx) -> dict:
        report = {}
        if self.cfg.scales == ScaleSource.generation:
            report.update(self.calibrate_scales_by_generation(ctx))
        report.update({"mquant/rms_split_points": len(self.split), "mquant/rms_split": self.split,
                       "mquant/channel0_ratio_max": max(self.ratios.values()) if self.ratios else 0.0,
                       "run/quantize_vision": bool(self.cfg.quantize_vision)})
        if self.vision:
            report.update({"mquant/vision_blocks": len(ctx.adapter.vision_blocks()),
                           "mquant/vision_calib_images": self.vision["images"],
                           "mquant/vision_calib_patches": self.vision["patches"],
                           "mquant/vision_act_scale_max": max(self.vision["scales"]),
                           "mquant/vision_rms_split": self.vision.get("split", 0)})
        if self.cfg.aifs and any(m != "text" for m in ctx.modalities):
            AIFS(ctx.adapter, ctx.router).attach()
            report["mquant/aifs"] = True
        return report
