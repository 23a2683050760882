"""The quantization scheme: bits and granularity, independent of any method."""

from __future__ import annotations

from dataclasses import asdict, dataclass

W_GRANULARITIES = ("channel", "group", "tensor")
A_GRANULARITIES = ("token", "tensor")


@dataclass(frozen=True)
class QuantScheme:
    """Bits and quantizer layout. 16 bits means 'not quantized'."""

    name: str = "fp16"
    w_bits: int = 16
    a_bits: int = 16
    w_symmetric: bool = True
    w_granularity: str = "channel"  # channel | group | tensor
    w_group_size: int = 0  # used when w_granularity == "group"
    w_clip_ratio: float = 1.0
    a_symmetric: bool = True
    a_granularity: str = "token"  # token | tensor
    a_dynamic: bool = True  # False: static per-tensor scale calibrated offline
    a_clip_ratio: float = 1.0

    def __post_init__(self) -> None:
        for key, bits in (("w_bits", self.w_bits), ("a_bits", self.a_bits)):
            if not 2 <= bits <= 16:
                raise ValueError(f"quant.{key}={bits}: must be in [2, 16] (16 = not quantized)")
        if self.w_granularity not in W_GRANULARITIES:
            raise ValueError(f"quant.w_granularity={self.w_granularity!r}: valid choices are {W_GRANULARITIES}")
        if self.a_granularity not in A_GRANULARITIES:
            raise ValueError(f"quant.a_granularity={self.a_granularity!r}: valid choices are {A_GRANULARITIES}")
        if self.w_granularity == "group" and self.w_group_size <= 0:
            raise ValueError("quant.w_group_size must be > 0 when quant.w_granularity='group'")
        for key, r in (("w_clip_ratio", self.w_clip_ratio), ("a_clip_ratio", self.a_clip_ratio)):
            if not 0.0 < r <= 1.0:
                raise ValueError(f"quant.{key}={r}: must be in (0, 1]")

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
    def tag(self) -> str:
        """Short label used in tables, e.g. 'W4A8' or 'W4A16-g128'."""
        if self.is_dense:
            return "FP16"
        tag = f"W{self.w_bits}A{self.a_bits}"
        if self.w_granularity == "group":
            tag += f"-g{self.w_group_size}"
        return tag

    def to_dict(self) -> dict:
        return asdict(self)
