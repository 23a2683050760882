"""Write a quantized model as a compressed-tensors checkpoint (a Hugging Face folder vLLM and transformers load).

Per quantized linear, from masquant's own grid (never re-derived by the library's observers):

- weights of fewer than 8 bits: ``pack-quantized``: the signed codes ``c - 2^(b-1)`` packed densely into int32
  along the input dimension (``weight_packed`` [out, ceil(in·b/32)], ``weight_shape``), ``weight_scale``
  [out, groups], and for an asymmetric grid ``weight_zero_point`` (``z - 2^(b-1)``, packed along the output
  dimension); 8-bit weights: ``int-quantized`` (``weight`` int8, ``weight_scale``, ``weight_zero_point``);
- ``strategy`` group (one group size dividing the width: :func:`masquant.export.grid.uniform_groups`), channel or
  tensor; GPTQ's act order as ``actorder: weight`` (groups in column order: ``quant.gptq_static_groups``);
- activations: dynamic per token (``strategy: token``) or per tensor, or a static per-tensor ``input_scale``
  (MQuant's and SmoothQuant's static scales), always symmetric on the full grid [-2^(b-1), 2^(b-1)-1] with
  scale absmax / ((2^b-1)/2): the format's only activation grid. A scheme on another grid is refused
  (:func:`activation_args`).

Float formats (``quant.w_format``), from the recorded grid as well:

- FP8 E4M3: ``float-quantized``: ``weight`` as float8_e4m3fn, ``weight_scale`` float32 per channel, tensor or group;
- NVFP4: ``nvfp4-pack-quantized``: ``weight_packed`` uint8 [out, in/2] (two E2M1 codes a byte, the even column in
  the low nibble: index of the magnitude in {0, .5, 1, 1.5, 2, 3, 4, 6}, sign in bit 3), ``weight_scale`` [out,
  in/16] float8_e4m3fn (the block scales s_b) and ``weight_global_scale`` [1] (g; a block dequantizes as code ·
  s_b / g); activations: dynamic block scales with a calibrated ``input_global_scale`` (quant.a_dynamic=false);
- MXFP4: ``mxfp4-pack-quantized``: ``weight_packed`` as NVFP4's, ``weight_scale`` uint8 [out, in/32] (the biased
  power-of-two exponent e + 127); activations dynamic in blocks of 32.

Modules that stay in full precision (lm_head, the vision tower and projector unless the method quantized them)
are listed in ``ignore``.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
import torch.nn as nn

from masquant.errors import ConfigError
from masquant.export.grid import format_group_size, integer_codes, uniform_groups
from masquant.quant.formats import BLOCK, round_e4m3
from masquant.quant.linear import DEFAULT_PATH, QuantLinear
from masquant.quant.scheme import QuantScheme

FORMAT_PACKED = "pack-quantized"
FORMAT_INT = "int-quantized"
FORMAT_FLOAT = "float-quantized"
FORMAT_NVFP4 = "nvfp4-pack-quantized"
FORMAT_MXFP4 = "mxfp4-pack-quantized"
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


# --- packing ---------------------------------------------------------------------------------------------------
def pack_int32(values: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed ``bits``-bit integers [rows, cols] densely into int32 words along ``dim`` (0 or 1).

    Value i of a row (offset to unsigned: v + 2^(b-1)) occupies bits [i·b, (i+1)·b) of the row's bit string, word
    j holding bits [32 j, 32 j + 32) least significant first; a value may straddle two words (3, 5, 6, 7 bits).
    This is compressed-tensors' ``pack-quantized`` layout (tests check it against the library's unpacking)."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits={bits}: packing takes 1 to 8 bits")
    v = values.to(torch.int64) + (1 << (bits - 1))
    if int(v.min()) < 0 or int(v.max()) >= 1 << bits:
        raise ValueError(f"values outside the signed {bits}-bit range")
    if dim == 0:
        v = v.t()
    rows, cols = v.shape
    n_words = math.ceil(cols * bits / 32)
    bit0 = torch.arange(cols, dtype=torch.int64) * bits  # first bit of each value
    words = torch.zeros(rows, n_words + 1, dtype=torch.int64)
    lo_word, shift = bit0 // 32, bit0 % 32
    words.index_add_(1, lo_word, (v << shift) & 0xFFFFFFFF)
    spill = shift + bits > 32  # the high bits of a straddling value go to the next word
    if spill.any():
        words.index_add_(1, lo_word[spill] + 1, v[:, spill] >> (32 - shift[spill]))
    words = words[:, :n_words]
    packed = torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)  # two's complement
    return packed.t().contiguous() if dim == 0 else packed


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """E2M1 values [rows, cols] (cols even) -> uint8 [rows, cols/2]: each value's 4-bit code (index of its magnitude
    in {0, .5, 1, 1.5, 2, 3, 4, 6}, the sign in bit 3), column 2j in the low nibble of byte j, 2j+1 in the high one
    (compressed-tensors' and vLLM's layout; tests check it against the library's unpacking)."""
    rows, cols = codes.shape
    if cols % 2:
        raise ValueError(f"E2M1 packing needs an even number of columns, got {cols}")
    table = torch.tensor(E2M1_MAGNITUDES, dtype=codes.dtype, device=codes.device)
    index = torch.searchsorted(table, codes.abs().contiguous())
    if int(index.max()) > 7 or not torch.equal(table[index.clamp(max=7)], codes.abs()):
        raise ValueError("values that are not E2M1 values")
    nibble = (index | (torch.signbit(codes).to(torch.int64) << 3)).to(torch.uint8).reshape(rows, cols // 2, 2)
    return (nibble[..., 0] | (nibble[..., 1] << 4)).contiguous()


# --- arguments ---------------------------------------------------------------------------------------------------
def float_activation_args(scheme: QuantScheme, where: str) -> dict:
    """``input_activations`` of a float format (FP8 per token / tensor, MXFP4, NVFP4 with a calibrated global
    scale), or a ConfigError naming what the checkpoint cannot express."""
    fmt = scheme.a_format.value
    bad = []
    if scheme.a_clip_ratio != 1.0:
        bad.append(f"quant.a_clip_ratio={scheme.a_clip_ratio} (the format has no activation clip)")
    if fmt in ("mxfp4", "nvfp4") and scheme.fp4_rounding.value != "even":
        bad.append("quant.fp4_rounding=away (the serving kernels round E2M1 ties to even)")
    if fmt == "mxfp4" and scheme.mx_scale_rule.value != "compressed_tensors":
        bad.append(f"quant.mx_scale_rule={scheme.mx_scale_rule.value} (the format computes the activations' block "
                   "exponents by its own rule: quant.mx_scale_rule=compressed_tensors)")
    if fmt == "nvfp4" and scheme.a_dynamic:
        bad.append("quant.a_dynamic=true (the activations' global scale is computed per input here; the checkpoint "
                   "holds a calibrated input_global_scale: use quant.a_dynamic=false quant.a_granularity=tensor with "
                   "a method that calibrates static scales (smoothquant, mquant), or a weight-only scheme such as "
                   "quant=w_nvfp4_a16)")
    if bad:
        raise ConfigError(f"export=compressed_tensors{where}: the checkpoint cannot quantize activations as "
                          f"quant={scheme.name} does: " + "; ".join(bad))
    if fmt == "fp8_e4m3":
        return {"num_bits": 8, "type": "float", "symmetric": True,
                "strategy": "token" if scheme.a_granularity == "token" else "tensor", "dynamic": bool(scheme.a_dynamic),
                "group_size": None, "observer": None if scheme.a_dynamic else "minmax"}
    if fmt == "mxfp4":
        return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group", "group_size": BLOCK[fmt],
                "dynamic": True, "scale_dtype": "torch.uint8", "observer": None}
    return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group", "group_size": BLOCK[fmt],
            "dynamic": "local", "scale_dtype": "torch.float8_e4m3fn", "observer": "static_minmax"}


def activation_args(scheme: QuantScheme, where: str = "") -> dict | None:
    """The format's ``input_activations`` for the scheme, or a ConfigError naming what it cannot express."""
    if not scheme.quantize_acts:
        return None
    if not scheme.a_int:
        return float_activation_args(scheme, where)
    bad = []
    if not scheme.a_symmetric:
        bad.append("quant.a_symmetric=false (the format's activation grid is symmetric)")
    if scheme.int_range.value != "full":
        bad.append(f"quant.int_range={scheme.int_range.value} (activations are quantized by the format on the full "
                   f"grid [-{2 ** (scheme.a_bits - 1)}, {2 ** (scheme.a_bits - 1) - 1}], scale absmax/"
                   f"{(2 ** scheme.a_bits - 1) / 2}; set quant.int_range=full)")
    if scheme.a_clip_ratio != 1.0:
        bad.append(f"quant.a_clip_ratio={scheme.a_clip_ratio} (the format has no activation clip)")
    if bad:
        raise ConfigError(f"export=compressed_tensors{where}: the checkpoint cannot quantize activations as "
                          f"quant={scheme.name} does: " + "; ".join(bad))
    strategy = "token" if scheme.a_granularity == "token" else "tensor"
    return {"num_bits": scheme.a_bits, "type": "int", "symmetric": True, "strategy": strategy,
            "dynamic": bool(scheme.a_dynamic), "group_size": None, "observer": None if scheme.a_dynamic else "minmax"}


def weight_args(lin: QuantLinear, group_size: int) -> dict:
    scheme = lin.scheme
    if scheme.w_format in ("mxfp4", "nvfp4"):
        nv = scheme.w_format == "nvfp4"
        return {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "tensor_group" if nv else "group",
                "group_size": BLOCK[scheme.w_format.value], "dynamic": False, "observer": "minmax",
                "scale_dtype": "torch.float8_e4m3fn" if nv else "torch.uint8",
                "actorder": "weight" if scheme.w_quantizer == "gptq" and scheme.gptq_act_order else None}
    strategy = {"group": "group", "channel": "channel", "tensor": "tensor"}[scheme.w_granularity.value]
    return {"num_bits": scheme.w_bits, "type": "int" if scheme.w_int else "float",
            "symmetric": bool(scheme.w_symmetric), "strategy": strategy,
            "group_size": group_size if strategy == "group" else None, "dynamic": False, "observer": "minmax",
            "actorder": "weight" if scheme.w_quantizer == "gptq" and scheme.gptq_act_order else None}


# --- tensors of one linear ---------------------------------------------------------------------------------------
def linear_tensors(name: str, lin: QuantLinear, group_size: int | None = None
                   ) -> tuple[dict[str, torch.Tensor], dict, str]:
    """({key: tensor} of one quantized linear, its scheme {weights, input_activations}, its format); ``group_size``:
    the format group size shared with the other linears (default: the linear's own, :func:`format_group_size`)."""
    scheme = lin.scheme
    try:
        codes = integer_codes(lin)
        g, scale, zero = uniform_groups(lin, group_size)
        if not scheme.w_int:
            out, fmt = float_weight_tensors(name, lin, codes, scale)
    except ConfigError as err:
        raise ConfigError(f"{err} (linear {name})") from None
    if not scheme.w_int:
        return _with_bias_and_inputs(out, name, lin), {"weights": weight_args(lin, g),
                                                      "input_activations": activation_args(scheme, f" ({name})")}, fmt
    bits = scheme.w_bits
    offset = 1 << (bits - 1)
    signed = (codes - (0 if scheme.w_symmetric else offset)).to(torch.int8)
    fmt = FORMAT_INT if bits == 8 else FORMAT_PACKED
    out: dict[str, torch.Tensor] = {}
    if fmt == FORMAT_PACKED:
        out[f"{name}.weight_packed"] = pack_int32(signed.cpu(), bits)
        out[f"{name}.weight_shape"] = torch.tensor([lin.out_features, lin.in_features])
    else:
        out[f"{name}.weight"] = signed.cpu()
    if scheme.w_granularity == "tensor":
        scale = scale.reshape(1)
        zero = None if zero is None else zero.reshape(1)
    out[f"{name}.weight_scale"] = scale.float().cpu().clone()
    if zero is not None:
        zp = (zero - offset).to(torch.int8).cpu()
        out[f"{name}.weight_zero_point"] = pack_int32(zp, bits, dim=0) if fmt == FORMAT_PACKED else zp
    acts = activation_args(scheme, f" ({name})")
    return _with_bias_and_inputs(out, name, lin), {"weights": weight_args(lin, g), "input_activations": acts}, fmt


def _with_bias_and_inputs(out: dict, name: str, lin: QuantLinear) -> dict:
    """The linear's bias and its static input scale (``input_scale``; NVFP4: ``input_global_scale``)."""
    scheme = lin.scheme
    if lin.bias is not None:
        out[f"{name}.bias"] = lin.bias.detach().cpu()
    if scheme.quantize_acts and not scheme.a_dynamic:
        s = lin.paths[DEFAULT_PATH].act_scale
        if s is None:
            raise ConfigError(f"export: {name} quantizes activations with a static scale but has none")
        key = "input_global_scale" if scheme.a_format == "nvfp4" else "input_scale"
        out[f"{name}.{key}"] = s.detach().float().reshape(1).cpu().clone()  # linears may share one scale
    return out


def float_weight_tensors(name: str, lin: QuantLinear, codes: torch.Tensor, scale: torch.Tensor
                         ) -> tuple[dict[str, torch.Tensor], str]:
    """The tensors of a float-format weight (module doc) from its element codes and recorded (effective) scales."""
    scheme = lin.scheme
    fmt = scheme.w_format.value
    if fmt == "fp8_e4m3":
        if scheme.w_granularity == "tensor":
            scale = scale.reshape(1)
        return {f"{name}.weight": codes.to(torch.float8_e4m3fn).cpu(),
                f"{name}.weight_scale": scale.float().cpu().clone()}, FORMAT_FLOAT
    block = BLOCK[fmt]
    if lin.in_features % block:
        raise ConfigError(f"export: a {fmt} linear of width {lin.in_features} ends in a block of "
                          f"{lin.in_features % block} inputs; the format needs the width to be a multiple of {block}")
    out = {f"{name}.weight_packed": pack_e2m1(codes.float().cpu())}
    if fmt == "mxfp4":
        e = torch.log2(scale.float())
        if not torch.equal(torch.exp2(e.round()), scale.float()) or float(e.min()) < -127 or float(e.max()) > 127:
            raise ConfigError("export: MXFP4 scales that are not powers of two in E8M0's range")
        out[f"{name}.weight_scale"] = (e.round() + 127).to(torch.uint8).cpu()
        return out, FORMAT_MXFP4
    g = lin.weight_global_scale
    if g is None:
        raise ConfigError("export: an NVFP4 linear without a recorded global scale (weight_global_scale)")
    g = g.float().reshape(1).to(scale.device)
    s_b = round_e4m3((scale.float() * g).clamp(-448, 448))
    if not torch.equal(s_b / g, scale.float()):
        raise ConfigError("export: NVFP4 block scales that are not E4M3 values over the global scale")
    out[f"{name}.weight_scale"] = s_b.to(torch.float8_e4m3fn).cpu()
    out[f"{name}.weight_global_scale"] = g.cpu().clone()
    return out, FORMAT_NVFP4


# --- the folder ---------------------------------------------------------------------------------------------------
def _suffix(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def config_groups(schemes: dict[str, tuple[dict, str]]) -> dict:
    """compressed-tensors ``config_groups``: one group per distinct (scheme, format). A group's targets are
    ``re:.*\\.<suffix>$`` patterns where every linear of that suffix has the group's scheme (what serving engines
    match on fused layers too), else the linears' names; one group for everything targets ``Linear``."""
    keyed: dict[str, list[str]] = defaultdict(list)
    specs = {}
    for name, (spec, fmt) in schemes.items():
        key = json.dumps([spec, fmt], sort_keys=True)
        keyed[key].append(name)
        specs[key] = (spec, fmt)
    suffix_keys: dict[str, set] = defaultdict(set)
    for key, names in keyed.items():
        for n in names:
            suffix_keys[_suffix(n)].add(key)
    groups = {}
    for i, (key, names) in enumerate(sorted(keyed.items(), key=lambda kv: kv[1][0])):
        spec, fmt = specs[key]
        if len(keyed) == 1:
            targets = ["Linear"]
        else:
            targets = sorted({f"re:.*\\.{_suffix(n)}$" if suffix_keys[_suffix(n)] == {key} else n for n in names})
        groups[f"group_{i}"] = {"targets": targets, **spec, "output_activations": None, "format": fmt}
    return groups


def ignored_linears(model: nn.Module, quantized: set[str]) -> list[str]:
    """Every linear left in full precision (lm_head, vision tower, projector...)."""
    return sorted(name for name, m in model.named_modules()
                  if isinstance(m, (nn.Linear, QuantLinear)) and name not in quantized)


def shared_group_sizes(linears: dict[str, QuantLinear]) -> dict:
    """One format group size per grouped scheme: the gcd of every linear's :func:`format_group_size` (transformers'
    dequantizing loader reads one scheme for all dense layers). E.g. the testbed at g128: widths 576 and 1536 give
    64, each group of 128 written as two groups of 64 with equal scales (exact; the scales take twice the room)."""
    sizes: dict = {}
    for lin in linears.values():
        if lin.scheme.w_granularity == "group" and lin.weight_scale is not None:
            sizes[lin.scheme] = math.gcd(sizes.get(lin.scheme, 0), format_group_size(lin))
    return sizes


def quantization_config(model: nn.Module) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json's ``quantization_config``, the quantized linears' tensors) of a deployable model."""
    from masquant.export.deployable import quant_linears

    tensors: dict[str, torch.Tensor] = {}
    schemes: dict[str, tuple[dict, str]] = {}
    linears = quant_linears(model)
    for name, lin in linears.items():
        if lin.scheme.quantize_acts and not lin.scheme.quantize_weights:
            raise ConfigError(f"export: {name} quantizes activations but not weights ({lin.scheme.tag}); "
                              "compressed-tensors quantizes activations only beside quantized weights")
    quantized = {n: lin for n, lin in linears.items() if lin.scheme.quantize_weights}
    shared = shared_group_sizes(quantized)
    for name, lin in quantized.items():
        t, spec, fmt = linear_tensors(name, lin, shared.get(lin.scheme))
        tensors.update(t)
        schemes[name] = (spec, fmt)
    if not schemes:
        raise ConfigError("export=compressed_tensors: the model has no quantized linear (a dense run); export the "
                          "FP model with save_pretrained instead")
    groups = config_groups(schemes)
    formats = {g["format"] for g in groups.values()}
    config = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ignored_linears(model, set(schemes)),
        "kv_cache_scheme": None,
    }
    return config, tensors


def checkpoint_state_dict(model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The model's state dict with every QuantLinear's entries replaced by its compressed tensors."""
    from masquant.export.deployable import quant_linears

    quantized = {name for name, lin in quant_linears(model).items() if lin.scheme.quantize_weights}
    plain = {name for name in quant_linears(model) if name not in quantized}
    sd = {}
    for key, value in model.state_dict().items():
        owner, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        if any(key.startswith(q + ".") for q in quantized):
            continue
        if any(key.startswith(p + ".") for p in plain):  # an FP QuantLinear: its weight and bias only
            if leaf not in ("weight", "bias") or owner not in plain:
                continue
        sd[key] = value.detach().cpu().contiguous()
    sd.update(tensors)
    return sd


def write_folder(model: nn.Module, processor, out_dir: Path) -> dict:
    """Write the checkpoint folder (safetensors, config.json with ``quantization_config``, processor files);
    returns the quantization config."""
    config, tensors = quantization_config(model)
    sd = checkpoint_state_dict(model, tensors)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = getattr(model.config, "quantization_config", None)
    model.config.quantization_config = config
    try:
        model.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
    finally:
        if previous is None:
            del model.config.quantization_config
        else:
            model.config.quantization_config = previous
    if processor is not None:
        from masquant.adapters.processors import save_processor_parts

        save_processor_parts(processor, out_dir, type(processor).__name__)
    return config
