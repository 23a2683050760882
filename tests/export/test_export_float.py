"""Export of the float formats (FP8 E4M3, NVFP4, MXFP4) to compressed-tensors: E2M1 packing against the library's,
and the round trip (export -> load with transformers + compressed-tensors in the model's own class -> the same
logits) per format and method; what the checkpoint cannot hold is refused before a model loads."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from compressed_tensors.compressors.nvfp4.helpers import pack_fp4_to_uint8, unpack_fp4_from_uint8

from masquant.adapters import get_adapter
from masquant.adapters.checkpoint import load_checkpoint
from masquant.errors import ConfigError
from masquant.export.compressed_tensors import pack_e2m1, write_folder
from masquant.export.deployable import make_deployable_
from masquant.export.runner import batch_logits, compare
from masquant.methods.registry import get_config_class
from masquant.quant import QuantScheme
from support.tiny import prompts, run_method, tiny

FP8 = QuantScheme("w_fp8_a_fp8", 8, 8, w_format="fp8_e4m3", a_format="fp8_e4m3")
FP8_A16 = QuantScheme("w_fp8_a16", 8, 16, w_format="fp8_e4m3")
FP8_STATIC = QuantScheme("w_fp8_a_fp8_static", 8, 8, w_format="fp8_e4m3", a_format="fp8_e4m3", a_dynamic=False,
                         a_granularity="tensor")
NVFP4_A16 = QuantScheme("w_nvfp4_a16", 4, 16, w_format="nvfp4", w_granularity="group", w_group_size=16)
NVFP4_STATIC = QuantScheme("w_nvfp4_a_nvfp4_static", 4, 4, w_format="nvfp4", a_format="nvfp4",
                           w_granularity="group", w_group_size=16, a_granularity="tensor", a_dynamic=False)
NVFP4 = QuantScheme("w_nvfp4_a_nvfp4", 4, 4, w_format="nvfp4", a_format="nvfp4", w_granularity="group",
                    w_group_size=16, a_granularity="tensor")
MXFP4 = QuantScheme("w_mxfp4_a_mxfp4", 4, 4, w_format="mxfp4", a_format="mxfp4", w_granularity="group",
                    w_group_size=32)
MXFP4_A16 = QuantScheme("w_mxfp4_a16", 4, 16, w_format="mxfp4", w_granularity="group", w_group_size=32)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def qwen():
    model, processor, cls = tiny("qwen2_5_vl")
    return model, processor, cls, prompts(processor, cls, 2, seed=7)


def test_e2m1_packing_is_the_library_layout():
    g = torch.Generator().manual_seed(0)
    values = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    codes = values[torch.randint(0, 8, (12, 64), generator=g)] * torch.where(torch.rand(12, 64, generator=g) < .5,
                                                                             -1.0, 1.0)
    packed = pack_e2m1(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (12, 32)
    assert torch.equal(packed, pack_fp4_to_uint8(codes.clone()))
    assert torch.equal(unpack_fp4_from_uint8(packed, 12, 64, dtype=torch.float32), codes)
    with pytest.raises(ValueError, match="not E2M1"):
        pack_e2m1(codes + 0.25)


ROUND_TRIPS = [  # (method, scheme, method options)
    ("rtn", FP8, {}),
    ("rtn", FP8_A16, {}),
    ("smoothquant", FP8_STATIC, {}),
    ("rtn", NVFP4_A16, {}),
    ("awq", NVFP4_A16, {}),
    ("smoothquant", NVFP4_STATIC, {}),
    ("mquant", NVFP4_STATIC, {"online_down": False}),
    ("rtn", MXFP4, {}),
    ("rtn", MXFP4_A16, {}),
    ("masquant", FP8, {"epochs": 1, "tie_scales": True}),
    ("masquant", NVFP4_A16, {"epochs": 1, "tie_scales": True}),
]


@pytest.mark.parametrize("method,scheme,options", ROUND_TRIPS,
                         ids=[f"{m}-{s.name}-{i}" for i, (m, s, _) in enumerate(ROUND_TRIPS)])
def test_float_checkpoint_reloads_to_the_same_logits(qwen, tmp_path, method, scheme, options):
    base, processor, cls, held = qwen
    model = copy.deepcopy(base)
    run_method(model, cls, processor, get_config_class(method)(**options), scheme)
    make_deployable_(model, get_adapter(model), "reround")
    write_folder(model, processor, tmp_path / "model")
    loaded = load_checkpoint(cls.model_cls(), tmp_path / "model", torch.float32).eval()
    check = compare(batch_logits(model, held, "cpu"), batch_logits(loaded, held, "cpu"))
    assert check["max_rel_diff"] <= 1e-6, check
    if scheme.w_format == "nvfp4":  # the folder itself: every weight decodes to the deployed one in float32
        assert_nvfp4_tensors_decode_exactly(model, tmp_path / "model")
    qc = json.loads((tmp_path / "model" / "config.json").read_text())["quantization_config"]
    fmt = {"fp8_e4m3": "float-quantized", "nvfp4": "nvfp4-pack-quantized", "mxfp4": "mxfp4-pack-quantized"}
    assert qc["format"] == fmt[scheme.w_format.value]
    if scheme.quantize_acts:  # the reload quantizes activations: without them the logits would differ
        for lin in model.modules():
            if hasattr(lin, "quantize_inputs"):
                lin.quantize_inputs = False
        assert compare(batch_logits(model, held, "cpu"), batch_logits(loaded, held, "cpu"))["max_rel_diff"] > 1e-4


def assert_nvfp4_tensors_decode_exactly(model, folder):
    """Every NVFP4 linear's packed codes, E4M3 block scales and global scale, decoded in float32 with the library's
    unpacking, give the deployed weight bit for bit."""
    from safetensors.torch import load_file

    from masquant.export.deployable import quant_linears

    tensors = {}
    for f in folder.glob("*.safetensors"):
        tensors.update(load_file(f))
    linears = {n: lin for n, lin in quant_linears(model).items() if lin.scheme.w_format == "nvfp4"}
    assert linears
    for name, lin in linears.items():
        key = name if f"{name}.weight_packed" in tensors else name.replace("model.language_model.", "model.")
        packed = tensors[f"{key}.weight_packed"]  # (the folder keeps the checkpoint's own key names)
        codes = unpack_fp4_from_uint8(packed, packed.shape[0], packed.shape[1] * 2, dtype=torch.float32)
        scale = tensors[f"{key}.weight_scale"].float() / tensors[f"{key}.weight_global_scale"].float()
        W = codes * scale.repeat_interleave(16, dim=1)
        assert torch.equal(W, lin.weight.detach().float()), name


def test_nvfp4_with_per_input_global_scales_is_refused_before_loading(compose_cfg, tiny_overrides):
    from masquant.export.runner import check_export_options

    cfg = compose_cfg(*tiny_overrides, "quant=w_nvfp4_a_nvfp4", "export=compressed_tensors")
    with pytest.raises(ConfigError, match="input_global_scale"):
        check_export_options(cfg)
    check_export_options(compose_cfg(*tiny_overrides, "quant=w_nvfp4_a_nvfp4", "quant.a_dynamic=false",
                                     "method=mquant", "export=compressed_tensors"))


def test_a_width_that_is_not_a_whole_number_of_blocks_is_refused(qwen):
    from masquant.quant.linear import QuantLinear
    from masquant.quant.quantizer import quantize_weight_grid, weight_global_scale
    from masquant.export.compressed_tensors import linear_tensors

    W = torch.randn(8, 40)
    W_q, scale, _ = quantize_weight_grid(W, NVFP4_A16)
    lin = QuantLinear(W_q, None, NVFP4_A16, weight_scale=scale, weight_global_scale=weight_global_scale(W, NVFP4_A16))
    with pytest.raises(ConfigError, match="multiple of 16"):
        linear_tensors("x", lin)
    lin = QuantLinear(W_q, None, NVFP4_A16, weight_scale=scale)
    with pytest.raises(ConfigError, match="global scale"):
        linear_tensors("x", QuantLinear(W_q[:, :32], None, NVFP4_A16, weight_scale=scale[:, :2]))
