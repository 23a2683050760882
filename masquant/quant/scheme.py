"""The quantization scheme: bits and granularity, independent of any method.

:class:`QuantScheme` also defines the typed Hydra schema of the ``quant`` config group
(:func:`config_schema` derives it from the same fields: a misspelt key or a bad choice fails when the
config is composed, naming the valid choices; the range checks run when the scheme is built).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass
from enum import Enum


class WGranularity(str, Enum):
    channel = "channel"
    group = "group"
    tensor = "tensor"


class AGranularity(str, Enum):
    token = "token"
    tensor = "tensor"


class IntRange(str, Enum):
    narrow = "narrow"  # [-(2^(b-1)-1), 2^(b-1)-1], scale absmax / (2^(b-1)-1): the paper's, official MASQuant
    full = "full"  # [-2^(b-1), 2^(b-1)-1], scale absmax / ((2^b-1)/2): compressed-tensors / vLLM kernels


class WQuantizer(str, Enum):
    rtn = "rtn"  # round to nearest at deploy (the scheme's grid)
    gptq = "gptq"  # GPTQ (masquant.quant.gptq) on Hessians of the walker's quantized stream; methods that honour it


W_GRANULARITIES = tuple(g.value for g in WGranularity)
A_GRANULARITIES = tuple(g.value for g in AGranularity)


def _enum(cls, value, key: str):
    try:
        return cls(getattr(value, "value", value))
    except ValueError:
        raise ValueError(f"quant.{key}={value!r}: valid choices are {[e.value for e in cls]}") from None


@dataclass(frozen=True)
class QuantScheme:
    """Bits and quantizer layout. 16 bits means 'not quantized'."""

    name: str = "fp16"
    w_bits: int = 16
    a_bits: int = 16
    w_symmetric: bool = True
    w_granularity: WGranularity = WGranularity.channel
    w_group_size: int = 0  # used when w_granularity == "group"
    w_clip_ratio: float = 1.0
    a_symmetric: bool = True
    a_granularity: AGranularity = AGranularity.token
    a_dynamic: bool = True  # False: static per-tensor scale calibrated offline
    a_clip_ratio: float = 1.0
    int_range: IntRange = IntRange.narrow  # integer grid of the symmetric quantizers (weights and activations)
    # How the weights are rounded (methods that do not honour these options refuse non-defaults in ``check``)
    w_quantizer: WQuantizer = WQuantizer.rtn
    w_mse_clip: bool = False  # per channel/group range shrink minimising |w - Q(w)|^2.4 (GPTQ/QuaRot's search)
    gptq_damp: float = 0.01  # dampening, relative to mean(diag H)
    gptq_block: int = 128  # lazy-update block of columns
    gptq_act_order: bool = False  # quantize columns by decreasing H[i, i]
    # with act order: every group's scale from the original W before any update, groups in the original column order
    # (GPTQ's static_groups; what a compressed-tensors checkpoint can hold: actorder='weight'). False: the official
    # GPTQ/QuaRot/MQuant code, a group's scale when its first (permuted) column is reached
    gptq_static_groups: bool = False
    # GPTQ as the official QuaRot/MQuant code runs it: a block's input groups in the order the block runs them
    # (q/k/v, o, gate/up, down), each group's Hessian from its own pass after the previous groups are quantized, on a
    # stream whose activations are not quantized. False: one pass per block for every group, on the deployed stream
    gptq_true_sequential: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "int_range", _enum(IntRange, self.int_range, "int_range"))
        object.__setattr__(self, "w_granularity", _enum(WGranularity, self.w_granularity, "w_granularity"))
        object.__setattr__(self, "a_granularity", _enum(AGranularity, self.a_granularity, "a_granularity"))
        object.__setattr__(self, "w_quantizer", _enum(WQuantizer, self.w_quantizer, "w_quantizer"))
        for key, bits in (("w_bits", self.w_bits), ("a_bits", self.a_bits)):
            if not 2 <= bits <= 16:
                raise ValueError(f"quant.{key}={bits}: must be in [2, 16] (16 = not quantized)")
        if self.w_granularity == "group" and self.w_group_size <= 0:
            raise ValueError("quant.w_group_size must be > 0 when quant.w_granularity='group'")
        for key, r in (("w_clip_ratio", self.w_clip_ratio), ("a_clip_ratio", self.a_clip_ratio)):
            if not 0.0 < r <= 1.0:
                raise ValueError(f"quant.{key}={r}: must be in (0, 1]")
        if self.quantize_acts and not self.a_dynamic and not self.a_symmetric:
            raise ValueError("quant.a_dynamic=false with quant.a_symmetric=false: static activation scales are "
                             "symmetric only; set quant.a_symmetric=true (or quant.a_dynamic=true)")
        if self.gptq_true_sequential and self.w_quantizer != "gptq":
            raise ValueError("quant.gptq_true_sequential=true is an option of quant.w_quantizer=gptq "
                             f"(quant.w_quantizer={self.w_quantizer.value})")
        if self.w_quantizer == "gptq" or self.w_mse_clip:
            what = "quant.w_quantizer=gptq" if self.w_quantizer == "gptq" else "quant.w_mse_clip=true"
            if not self.quantize_weights:
                raise ValueError(f"{what} needs quantized weights (quant.w_bits < 16)")
            if self.w_granularity == "tensor":
                raise ValueError(f"{what} quantizes per output channel or per group, not quant.w_granularity=tensor")
            if self.w_clip_ratio != 1.0:
                raise ValueError(f"{what} searches or keeps the full range; quant.w_clip_ratio={self.w_clip_ratio} "
                                 "must stay 1.0 (use quant.w_mse_clip=true for a searched clip)")
        if not 0.0 <= self.gptq_damp < 1.0:
            raise ValueError(f"quant.gptq_damp={self.gptq_damp}: must be in [0, 1)")
        if self.gptq_block < 1:
            raise ValueError(f"quant.gptq_block={self.gptq_block}: must be >= 1")

    @property
    def quantize_weights(self) -> bool:
        return self.w_bits < 16

    @property
    def quantize_acts(self) -> bool:
        return self.a_bits < 16

    @property
    def is_dense(self) -> bool:
        return not (self.quantize_weights or self.quantize_acts)

    @property
    def weight_only(self) -> bool:
        return self.quantize_weights and not self.quantize_acts

    @property
    def default_weight_rounding(self) -> bool:
        """True when the weights are rounded to nearest on the full range (what every method can deploy)."""
        return self.w_quantizer == WQuantizer.rtn and not self.w_mse_clip

    @property
    def tag(self) -> str:
        """Short label used in tables, e.g. 'W4A8' or 'W4A16-g128'."""
        if self.is_dense:
            return "FP16"
        tag = f"W{self.w_bits}A{self.a_bits}"
        if self.w_granularity == "group":
            tag += f"-g{self.w_group_size}"
        return tag

    @property
    def grid(self) -> str:
        """The integer grids in words, for tables: e.g. 'W asym g128 / A16' or 'W sym narrow / A sym token dyn'."""
        if self.is_dense:
            return "FP16"
        parts = []
        if self.quantize_weights:
            w = "sym " + self.int_range.value if self.w_symmetric else "asym"
            parts.append(f"W {w}" + (f" g{self.w_group_size}" if self.w_granularity == "group" else ""))
        else:
            parts.append("W16")
        if self.quantize_acts:
            a = "sym " + self.int_range.value if self.a_symmetric else "asym"
            parts.append(f"A {a} {self.a_granularity.value} {'dyn' if self.a_dynamic else 'static'}")
        else:
            parts.append("A16")
        return " / ".join(parts)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: getattr(v, "value", v) for k, v in d.items()}


def config_schema(cls: type = QuantScheme) -> type:
    """A mutable twin of a frozen dataclass (Hydra cannot apply overrides to a frozen, read-only node)."""
    hints = typing.get_type_hints(cls)
    return dataclasses.make_dataclass(
        f"{cls.__name__}Config",
        [(f.name, hints[f.name], dataclasses.field(default=f.default)) for f in dataclasses.fields(cls)])
