"""Low-precision float element formats and their block scales: FP8 E4M3, MXFP4 and NVFP4. Pure tensor functions.

A float format replaces the integer grid's ``round(x / scale)`` by rounding ``x / scale`` to the nearest value of a
small float type, and fixes how the scale itself is stored:

  fp8_e4m3  elements E4M3 (max 448, RNE, saturating), scale = absmax / 448 in float32 (per tensor, channel, token)
  mxfp4     elements E2M1 {0, .5, 1, 1.5, 2, 3, 4, 6}, blocks of 32, one power-of-two scale per block (E8M0)
  nvfp4     elements E2M1, blocks of 16, an FP8 E4M3 block scale s_b and an FP32 global scale g per tensor:
            g = 448·6 / absmax(tensor), s_b = E4M3(g · absmax(block) / 6), the effective scale s_b / g

Every rule below reproduces compressed-tensors 0.20 (the format vLLM loads: ``calculate_qparams``,
``generate_mx_scales``, ``cast_to_fp4``, ``generate_gparam``), operation for operation, so the values are equal bit
for bit (``tests/quant/test_float_formats.py`` compares against the library's own functions). Where references
disagree, the rule is an option (``quant.fp4_rounding``, ``quant.mx_scale_rule``) with the library's as default:

  E2M1 ties    even   round half to even on the E2M1 grid (compressed-tensors' ``cast_to_fp4``, torchao, the
                      hardware's RNE conversion)
               away   round half away from zero (microxcaling's ``_round_mantissa`` in "nearest" mode)
  MX exponent  compressed_tensors  round absmax to a power of two at the element's mantissa width (up when its
                      mantissa is >= 1.75 for E2M1), then subtract floor(log2 6) = 2 (compressed-tensors'
                      ``generate_mx_scales``, after vLLM's reference_mxfp4)
               floor  floor(log2 absmax) - 2: the OCP MX v1.0 specification's rule (microxcaling; torchao FLOOR);
                      a block whose absmax has a mantissa above 1.5 clips its largest element to 6
               rceil  ceil(log2(absmax / 6)): no element ever clips (torchao RCEIL, NVIDIA's conversion)

Zero scales are replaced as compressed-tensors does (by the epsilon of the scale's storage type: 0.125 for an E4M3
block scale, float32's eps for a float scale), so an all-zero block still has a finite scale (its codes are 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FLOAT_FORMATS = ("fp8_e4m3", "mxfp4", "nvfp4")
FORMATS = ("int",) + FLOAT_FORMATS
FP4_ROUNDINGS = ("even", "away")
MX_SCALE_RULES = ("compressed_tensors", "floor", "rceil")

E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
E2M1_MAX = 6.0
E2M1_EMAX = 2  # floor(log2(6))
E8M0_BIAS = 127
E4M3_EPS = 0.125  # what compressed-tensors puts in place of a zero E4M3 scale
BITS = {"fp8_e4m3": 8, "mxfp4": 4, "nvfp4": 4}
BLOCK = {"fp8_e4m3": 0, "mxfp4": 32, "nvfp4": 16}  # 0: no fixed block (per tensor / channel / token / group)


def round_e4m3(v: torch.Tensor) -> torch.Tensor:
    """v (already within ±448) rounded to the nearest E4M3 value, ties to even, in v's dtype."""
    return v.to(torch.float8_e4m3fn).to(v.dtype)


def round_e2m1(v: torch.Tensor, ties: str = "even") -> torch.Tensor:
    """v (already within ±6) rounded to the nearest E2M1 value {0, .5, 1, 1.5, 2, 3, 4, 6}·sign.

    The grid's spacing is 0.5 below 2, 1 in [2, 4) and 2 in [4, 6]: each segment rounds v / spacing to an integer.
    ``ties='even'``: half to even (the even E2M1 codes are 0, 1, 2, 4; e.g. 0.25 -> 0, 0.75 -> 1, 5 -> 4);
    ``'away'``: half away from zero (0.25 -> 0.5, 5 -> 6)."""
    a = v.abs()
    step = torch.where(a < 2, 0.5, torch.where(a < 4, 1.0, 2.0)).to(v.dtype)
    u = a / step
    r = torch.round(u) if ties == "even" else torch.floor(u + 0.5)
    return torch.sign(v) * (r * step).clamp(max=E2M1_MAX)


def round_to_power_of_two(x: torch.Tensor, mantissa_bits: int = 1) -> torch.Tensor:
    """Positive float32 x rounded to a power of two: up when the bits below the kept ``mantissa_bits`` + 1 round
    the mantissa over (for E2M1, mantissa >= 1.75), else down; on the float's bits (compressed-tensors' rule)."""
    bits = x.float().contiguous().view(torch.int32)
    carry = 1 << (23 - mantissa_bits - 1)
    sign_exponent = ((1 << 9) - 1) << 23
    return torch.bitwise_and(bits + carry, sign_exponent).view(torch.float32)


def mx_exponent(absmax: torch.Tensor, rule: str = "compressed_tensors") -> torch.Tensor:
    """The unbiased power-of-two exponent e of an MXFP4 block scale 2^e, from the block's absmax (float32), clamped
    to E8M0's range [-127, 128] (as a uint8 cast of e + 127 would). See the module docstring for the rules."""
    a = absmax.float()
    if rule == "compressed_tensors":
        e = torch.floor(torch.log2(round_to_power_of_two(a))) - E2M1_EMAX
    elif rule == "floor":
        e = torch.floor(torch.log2(a)) - E2M1_EMAX
    elif rule == "rceil":
        e = torch.ceil(torch.log2(a / E2M1_MAX))
    else:
        raise ValueError(f"mx_scale_rule={rule!r}: valid choices are {MX_SCALE_RULES}")
    return (e + E8M0_BIAS).clamp(0, 255) - E8M0_BIAS  # log2(0) = -inf -> the smallest exponent, -127


def mx_scale(absmax: torch.Tensor, rule: str = "compressed_tensors") -> torch.Tensor:
    """2^e in float32 (:func:`mx_exponent`)."""
    return torch.exp2(mx_exponent(absmax, rule))


def nvfp4_global_scale(absmax: torch.Tensor) -> torch.Tensor:
    """g = 448·6 / absmax (float32; 1 where absmax is 0 or not finite): the tensor's global scale, which maps the
    largest block scale to E4M3's maximum."""
    a = absmax.float().clamp(min=torch.finfo(torch.float32).tiny)
    return torch.nan_to_num(E4M3_MAX * E2M1_MAX / a, nan=1.0, posinf=1.0, neginf=1.0)


def nvfp4_block_scale(absmax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """The E4M3 block scale s_b = E4M3(g · absmax / 6) as float32 (0 -> 0.125); the effective scale is s_b / g."""
    s = global_scale * (absmax.float() / E2M1_MAX)
    s = round_e4m3(s.clamp(-E4M3_MAX, E4M3_MAX))
    return torch.where(s == 0, torch.full_like(s, E4M3_EPS), s)


def _ste_scale(scale: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
    """``scale`` whose gradient w.r.t. ``absmax`` is scale / absmax (the value unchanged): the straight-through
    estimator of a scale that is rounded (a power of two, an E4M3 value) or floored."""
    live = absmax.detach() > 0
    ratio = torch.where(live, absmax / torch.where(live, absmax.detach(), torch.ones_like(absmax)), 1.0)
    return scale.detach() * ratio


@dataclass(frozen=True, eq=False)
class FloatGrid:
    """The element grid and scale rule of a float format (see the module docstring). Symmetric, no zero point.

    ``global_scale`` (nvfp4 only): the tensor's g, fixed before the blocks are scaled (from the whole weight, or
    from an activation tensor / its calibrated abs-max). None for nvfp4 means each call's reduction computes g from
    the absmax of what it is given (used only where the caller passes the whole tensor)."""

    format: str
    fp4_rounding: str = "even"
    mx_scale_rule: str = "compressed_tensors"
    global_scale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.format not in FLOAT_FORMATS:
            raise ValueError(f"format={self.format!r}: valid float formats are {FLOAT_FORMATS}")
        if self.fp4_rounding not in FP4_ROUNDINGS:
            raise ValueError(f"fp4_rounding={self.fp4_rounding!r}: valid choices are {FP4_ROUNDINGS}")
        if self.mx_scale_rule not in MX_SCALE_RULES:
            raise ValueError(f"mx_scale_rule={self.mx_scale_rule!r}: valid choices are {MX_SCALE_RULES}")

    symmetric = True

    @property
    def bits(self) -> int:
        return BITS[self.format]

    @property
    def qmax(self) -> float:
        return E4M3_MAX if self.format == "fp8_e4m3" else E2M1_MAX

    @property
    def qmin(self) -> float:
        return -self.qmax

    @property
    def half_levels(self) -> float:
        return self.qmax

    def with_global_scale(self, global_scale: torch.Tensor | None) -> "FloatGrid":
        return FloatGrid(self.format, self.fp4_rounding, self.mx_scale_rule, global_scale)

    def bind(self, x: torch.Tensor) -> "FloatGrid":
        """nvfp4: this grid with g from the absmax of the whole of ``x`` (no gradient); other formats: self."""
        if self.format != "nvfp4":
            return self
        return self.with_global_scale(nvfp4_global_scale(x.detach().abs().amax().float()))

    def scale(self, absmax: torch.Tensor, ste: bool = False) -> torch.Tensor:
        """The effective scale (x ≈ code · scale) of slices with this (clipped) absmax, float32."""
        a = absmax.detach().float()
        if self.format == "fp8_e4m3":
            s = a / E4M3_MAX
            s = torch.where(s == 0, torch.full_like(s, torch.finfo(torch.float32).eps), s)
        elif self.format == "mxfp4":
            s = mx_scale(a, self.mx_scale_rule)
        else:
            g = self.global_scale if self.global_scale is not None else nvfp4_global_scale(a.amax())
            g = g.to(a.device)
            s = nvfp4_block_scale(a, g) / g
        return _ste_scale(s, absmax.float()) if ste else s

    def round(self, v: torch.Tensor) -> torch.Tensor:
        """v / scale, clamped to the element range, rounded to the element grid (same dtype)."""
        v = v.clamp(self.qmin, self.qmax)
        return round_e4m3(v) if self.format == "fp8_e4m3" else round_e2m1(v, self.fp4_rounding)
