"""QuaRot (spcl/QuaRot) on the adapters: rotations, GPTQ or RTN weights, dynamic per-token activations.

``transform_model_`` runs QuaRot's offline steps (:func:`masquant.transforms.rotation.rotate_model_`): norm
fusion, the residual rotation Q (random Hadamard, ``seed``), a Hadamard per head between v and o made a full
Hadamard of o_proj's input by an online transform across heads (``o_rotation=full``, official QuaRot;
``per_head`` keeps it within each head, MQuant's choice), and the online Hadamard on down_proj's input
(``rotation_mode`` for widths without a Hadamard matrix: pad, the default, or block). Then every decoder linear
is deployed: weights as ``quant.w_quantizer`` says (rtn, or gptq on the walker's quantized stream; QuaRot's
paper default is GPTQ with the MSE weight clip, the project's scheme default RTN: ``recipe=official`` sets
QuaRot's own), activations dynamic per token with QuaRot's clip where its recipe uses one: ``a_clip_ratio``
null (the default) clips at 0.9 of the per-token abs-max when activations have 4 bits or fewer (the W4A4
recipe) and not at all above (the official code's default, 1.0); a number applies at every bit width.
lm_head stays 16-bit (it is never a decoder linear).
Optional KV cache: ``kv_bits`` < 16 quantizes K (after RoPE and an online Hadamard, ``k_hadamard``) and V
asymmetrically per token and head, groups of ``kv_group_size``, clip ``kv_clip_ratio``.

Models the adapter cannot rotate exactly (Gemma 3) are refused with the adapter's reason.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

from baselines.quarot.core import KVQuantizer
from masquant.engine.weights import block_weights
from masquant.methods.base import BlockPlan, Method, MethodConfigError, Walk
from masquant.methods.registry import register_method
from masquant.transforms.rotation import ORotation, RotationMode, RotationUnsupported, rotate_model_

LOW_BIT_ACT_CLIP = 0.9  # QuaRot's activation clip in its 4-bit-activation recipe (--a_clip_ratio 0.9)


def official_act_clip(a_bits: int) -> float:
    """QuaRot's activation clip ratio for a bit width: 0.9 at 4 bits or fewer, none (1.0) above."""
    return LOW_BIT_ACT_CLIP if a_bits <= 4 else 1.0


@dataclass
class QuaRotConfig:
    id: str = "quarot"
    seed: int = 0  # random signs of the residual rotation Q
    rotation_mode: RotationMode = RotationMode.pad  # widths without a Hadamard matrix (down_proj's input)
    online_down: bool = True  # online Hadamard on down_proj's input
    o_rotation: ORotation = ORotation.full  # o_proj's input: full (official, online across heads) | per_head
    # per-token activation clip: null = QuaRot's rule (0.9 at a_bits <= 4 on an integer grid, none above and none on
    # a float format, which its block scales clip; quant.a_clip_ratio when set); a number = that clip at every width
    a_clip_ratio: Optional[float] = None
    kv_bits: int = 16  # < 16: quantize the KV cache
    kv_group_size: int = 128
    kv_clip_ratio: float = 0.95
    k_hadamard: bool = True  # online Hadamard on q and k after RoPE (with kv_bits < 16)

    def __post_init__(self):
        if self.a_clip_ratio is not None and not 0.0 < self.a_clip_ratio <= 1.0:
            raise ValueError(f"method.a_clip_ratio={self.a_clip_ratio}: must be in (0, 1] or null")
        if not 2 <= self.kv_bits <= 16:
            raise ValueError(f"method.kv_bits={self.kv_bits}: must be in [2, 16] (16 = KV cache not quantized)")
        if self.kv_group_size < 1 or not 0.0 < self.kv_clip_ratio <= 1.0:
            raise ValueError("method.kv_group_size must be >= 1 and method.kv_clip_ratio in (0, 1]")


def rotate_or_refuse_(adapter, seed: int, mode, online_down: bool, method: str, o_rotation="per_head") -> dict:
    """QuaRot's offline transform, or a MethodConfigError naming why the model cannot be rotated."""
    try:
        return rotate_model_(adapter, seed=seed, mode=mode, online_down=online_down, o_rotation=o_rotation)
    except RotationUnsupported as err:
        raise MethodConfigError(f"method={method}: {err}") from None


def refuse_unrotatable(method_id: str, adapter_cls: type) -> None:
    """A MethodConfigError, before loading, for a family whose residual stream cannot be rotated exactly."""
    reason = adapter_cls.residual_rotation_refusal()
    if reason:
        raise MethodConfigError(f"method={method_id}: {reason}")


@register_method("quarot", config=QuaRotConfig, order=50)
class QuaRot(Method):
    export_refusal = ("its online Hadamard transforms (before down_proj and, with o_rotation, o_proj) run at "
                      "inference, and masquant does not write compressed-tensors' transform config")
    needs_calibration = False  # RTN weights need none; GPTQ asks for it (requires_calibration)
    honours_weight_options = True
    dynamic_only_reason = "per token, as QuaRot; method=mquant is QuaRot with static per-tensor scales"

    def accepts_fp16(self) -> bool:
        return self.cfg.kv_bits < 16  # the KV cache alone

    def check_config(self, scheme, modalities) -> None:
        clip = self.cfg.a_clip_ratio
        if clip is not None and scheme.a_clip_ratio not in (1.0, clip):
            raise MethodConfigError(f"quant.a_clip_ratio={scheme.a_clip_ratio} and method.a_clip_ratio={clip} "
                                    "disagree; set one (method.a_clip_ratio=null keeps the scheme's)")

    def check_adapter(self, adapter_cls) -> None:
        refuse_unrotatable(self.id, adapter_cls)

    def act_clip(self, scheme) -> float:
        """The activation clip deployed: method.a_clip_ratio, else quant.a_clip_ratio when set, else QuaRot's rule."""
        if self.cfg.a_clip_ratio is not None:
            return self.cfg.a_clip_ratio
        if scheme.a_clip_ratio != 1.0:
            return scheme.a_clip_ratio
        return official_act_clip(scheme.a_bits) if scheme.a_int else 1.0

    def deploy_scheme(self, scheme):
        if not scheme.quantize_acts:
            return scheme
        return dataclasses.replace(scheme, a_clip_ratio=self.act_clip(scheme))

    def transform_model_(self, ctx) -> dict:
        cfg = self.cfg
        return rotate_or_refuse_(ctx.adapter, cfg.seed, cfg.rotation_mode, cfg.online_down, self.id, cfg.o_rotation)

    def prepare(self, ctx):
        ctx.scheme = self.deploy_scheme(ctx.scheme)
        cfg = self.cfg
        self.kv = KVQuantizer(cfg.kv_bits, cfg.kv_group_size, cfg.kv_clip_ratio, cfg.k_hadamard) if cfg.kv_bits < 16 \
            else None

    def walk(self, ctx, stack):
        if ctx.scheme.w_quantizer == "gptq":  # GPTQ's Hessians come from the quantized stream
            return Walk(fp_stream=False, quantized_stream=True, stats=False)
        return None

    def plan_block(self, ctx, step) -> BlockPlan:
        if self.kv is not None:
            ctx.adapter.wrap_attention_kernel_(step.block, self.kv)
        gptq = ctx.scheme.w_quantizer == "gptq"
        return BlockPlan(weights=block_weights(ctx, step if gptq else None, step.block))

    def finish(self, ctx) -> dict:
        return {"quarot/a_clip_ratio": ctx.scheme.a_clip_ratio, "quarot/kv_bits": self.cfg.kv_bits,
                "quarot/o_rotation": str(getattr(self.cfg.o_rotation, "value", self.cfg.o_rotation))}
