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

from masquant.quant.formats import BITS as FORMAT_BITS
from masquant.quant.formats import BLOCK as FORMAT_BLOCK


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


class NumberFormat(str, Enum):
    """The element format of a quantized tensor (masquant.quant.formats): an integer grid or a float format."""

    int = "int"
    fp8_e4m3 = "fp8_e4m3"  # E4M3 elements, a float32 scale per tensor / channel / token / group
    mxfp4 = "mxfp4"  # E2M1 elements, blocks of 32 with a power-of-two (E8M0) scale
    nvfp4 = "nvfp4"  # E2M1 elements, blocks of 16 with an E4M3 scale, and a float32 global scale per tensor


class FP4Rounding(str, Enum):
    even = "even"  # E2M1 ties to even: compressed-tensors' cast_to_fp4, torchao, the hardware's conversion
    away = "away"  # ties away from zero: microxcaling


class MXScaleRule(str, Enum):
    compressed_tensors = "compressed_tensors"  # absmax rounded to a power of two (mantissa >= 1.75 up), minus 2
    floor = "floor"  # floor(log2 absmax) - 2: the OCP MX v1.0 specification, microxcaling, torchao FLOOR
    rceil = "rceil"  # ceil(log2(absmax / 6)): no element clips; torchao RCEIL


class WQuantizer(str, Enum):
    rtn = "rtn"  # round to nearest at deploy (the scheme's grid)
    gptq = "gptq"  # GPTQ (masquant.quant.gptq) on Hessians of the walker's quantized stream; methods that honour it


W_GRANULARITIES = tuple(g.value for g in WGranularity)


def _format_tag(fmt, bits: int) -> str:
    return {"fp8_e4m3": "FP8", "mxfp4": "MXFP4", "nvfp4": "NVFP4"}.get(getattr(fmt, "value", fmt), f"INT{bits}")
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
    # Element formats (masquant.quant.formats). A float format fixes the bits (fp8_e4m3: 8, mxfp4/nvfp4: 4) and, for
    # mxfp4/nvfp4, the block: weights quant.w_granularity=group with quant.w_group_size=32/16; activations in blocks
    # of 32/16 along each token's channels (nvfp4: quant.a_granularity is the global scale's, tensor or token)
    w_format: NumberFormat = NumberFormat.int
    a_format: NumberFormat = NumberFormat.int
    fp4_rounding: FP4Rounding = FP4Rounding.even  # E2M1 ties (mxfp4, nvfp4)
    mx_scale_rule: MXScaleRule = MXScaleRule.compressed_tensors  # the block exponent of mxfp4
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
        for key, cls in (("w_format", NumberFormat), ("a_format", NumberFormat), ("fp4_rounding", FP4Rounding),
                         ("mx_scale_rule", MXScaleRule)):
            object.__setattr__(self, key, _enum(cls, getattr(self, key), key))
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
        self._check_formats()
        if not 0.0 <= self.gptq_damp < 1.0:
            raise ValueError(f"quant.gptq_damp={self.gptq_damp}: must be in [0, 1)")
        if self.gptq_block < 1:
            raise ValueError(f"quant.gptq_block={self.gptq_block}: must be >= 1")

    def _check_formats(self) -> None:
        """A float format's fixed bits, symmetry and blocks (quant.w_format / quant.a_format)."""
        for side, fmt, bits, sym in (("w", self.w_format, self.w_bits, self.w_symmetric),
                                     ("a", self.a_format, self.a_bits, self.a_symmetric)):
            if fmt == "int":
                continue
            need = FORMAT_BITS[fmt.value]
            if bits != need:
                raise ValueError(f"quant.{side}_format={fmt.value} has {need}-bit elements: set "
                                 f"quant.{side}_bits={need} (quant.{side}_bits={bits})")
            if not sym:
                raise ValueError(f"quant.{side}_format={fmt.value} is symmetric (no zero point): set "
                                 f"quant.{side}_symmetric=true")
        w, a = self.w_format.value, self.a_format.value
        if w in FORMAT_BLOCK and FORMAT_BLOCK[w]:
            if self.w_granularity != "group" or self.w_group_size != FORMAT_BLOCK[w]:
                raise ValueError(f"quant.w_format={w} scales blocks of {FORMAT_BLOCK[w]} inputs: set "
                                 f"quant.w_granularity=group quant.w_group_size={FORMAT_BLOCK[w]} (quant.w_granularity="
                                 f"{self.w_granularity.value}, quant.w_group_size={self.w_group_size})")
        if a == "mxfp4" and (self.a_granularity != "token" or not self.a_dynamic):
            raise ValueError("quant.a_format=mxfp4 has only per-block power-of-two scales, computed from each input "
                             "(blocks of 32 channels of a token): set quant.a_granularity=token quant.a_dynamic=true "
                             f"(quant.a_granularity={self.a_granularity.value}, quant.a_dynamic={self.a_dynamic})")
        if a == "nvfp4" and not self.a_dynamic and self.a_granularity != "tensor":
            raise ValueError("quant.a_format=nvfp4 with quant.a_dynamic=false calibrates one global scale per tensor: "
                             "set quant.a_granularity=tensor")

    @property
    def w_int(self) -> bool:
        """The weights are on an integer grid (quant.w_format=int)."""
        return self.w_format == NumberFormat.int

    @property
    def a_int(self) -> bool:
        """The activations are on an integer grid (quant.a_format=int)."""
        return self.a_format == NumberFormat.int

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
        """Short label used in tables, e.g. 'W4A8', 'W4A16-g128', 'NVFP4', 'NVFP4-A16' or 'W-MXFP4 A-FP8'."""
        if self.is_dense:
            return "FP16"
        if self.w_int and self.a_int:
            tag = f"W{self.w_bits}A{self.a_bits}"
            if self.w_granularity == "group":
                tag += f"-g{self.w_group_size}"
            return tag
        w = _format_tag(self.w_format, self.w_bits) if self.quantize_weights else "W16"
        a = _format_tag(self.a_format, self.a_bits) if self.quantize_acts else "A16"
        if self.quantize_weights and self.quantize_acts and w == a:
            return w
        if not self.quantize_acts:
            return f"{w}-A16"
        return f"W-{w} A-{a}" if self.quantize_weights else f"W16 A-{a}"

    @property
    def grid(self) -> str:
        """The integer grids in words, for tables: e.g. 'W asym g128 / A16' or 'W sym narrow / A sym token dyn'."""
        if self.is_dense:
            return "FP16"
        parts = []
        if self.quantize_weights:
            w = ("sym " + self.int_range.value if self.w_symmetric else "asym") if self.w_int else self.w_format.value
            parts.append(f"W {w}" + (f" g{self.w_group_size}" if self.w_granularity == "group" else ""))
        else:
            parts.append("W16")
        if self.quantize_acts:
            a = ("sym " + self.int_range.value if self.a_symmetric else "asym") if self.a_int else self.a_format.value
            if self.a_format in ("mxfp4", "nvfp4"):
                a += f" b{FORMAT_BLOCK[self.a_format.value]}"
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
