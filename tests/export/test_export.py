"""Export to compressed-tensors: packing against the library, exact groups, and the round trip (export -> load with
transformers + compressed-tensors in the model's own class -> the same logits), per scheme, per method and per
adapter family; LoRA adapters that reproduce CMC's branches; refusals that name what cannot be written."""

from __future__ import annotations

import copy
import json

import compressed_tensors.compressors.pack_quantized.helpers as ct_helpers
import peft
import pytest
import torch

from masquant.adapters import get_adapter
from masquant.errors import ConfigError
from masquant.adapters.checkpoint import load_checkpoint
from masquant.export.compressed_tensors import pack_int32, write_folder
from masquant.export.deployable import make_deployable_
from masquant.export.grid import integer_codes, uniform_groups
from masquant.export.runner import batch_logits, compare
from masquant.methods.registry import get_config_class
from masquant.quant import QuantScheme
from masquant.quant.linear import QuantLinear
from masquant.quant.quantizer import quantize_weight_grid
from support.tiny import MODEL_TYPES, prompts, run_method, tiny


W4_G48_ASYM = QuantScheme("w4a16_g48", 4, 16, w_symmetric=False, w_granularity="group", w_group_size=48)
W4_G32 = QuantScheme("w4a16_g32", 4, 16, w_granularity="group", w_group_size=32)
W3_G32_ASYM = QuantScheme("w3a16_g32", 3, 16, w_symmetric=False, w_granularity="group", w_group_size=32)
W8A8 = QuantScheme("w8a8", 8, 8, int_range="full")
W4A8 = QuantScheme("w4a8", 4, 8, int_range="full")
W8A8_STATIC = QuantScheme("w8a8_static", 8, 8, int_range="full", a_dynamic=False, a_granularity="tensor")


pytestmark = pytest.mark.usefixtures("one_thread")  # numbers that do not depend on the core count


@pytest.fixture(scope="module")
def qwen():
    model, processor, cls = tiny("qwen2_5_vl")
    return model, processor, cls, prompts(processor, cls, 2, seed=7)


def export_and_reload(model, processor, cls, tmp_path, unfoldable="reround"):
    """(report, the folder, the reloaded model) after turning ``model`` into its deployable variant in place."""
    report = make_deployable_(model, get_adapter(model), unfoldable)
    folder = tmp_path / "model"
    write_folder(model, processor, folder)
    loaded = load_checkpoint(cls.model_cls(), folder, torch.float32).eval()
    return report, folder, loaded


def quantized(base, processor, cls, method: str, scheme: QuantScheme, **options):
    model = copy.deepcopy(base)
    cfg = get_config_class(method)(**options)
    run_method(model, cls, processor, cfg, scheme)
    return model


# --- packing and groups ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_is_the_library_layout(bits, dim):
    g = torch.Generator().manual_seed(bits)
    values = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (24, 77), generator=g).to(torch.int8)
    packed = pack_int32(values, bits, dim)
    assert torch.equal(packed, ct_helpers.pack_to_int32(values, bits, packed_dim=dim))
    unpacked = ct_helpers.unpack_from_int32(packed, bits, values.shape, packed_dim=dim)
    assert torch.equal(unpacked, values)


def test_packing_refuses_values_off_the_grid():
    with pytest.raises(ValueError, match="outside the signed 4-bit range"):
        pack_int32(torch.tensor([[8, 0]], dtype=torch.int8), 4)


@pytest.mark.parametrize("scheme", [W4_G48_ASYM, W4_G32, W3_G32_ASYM], ids=lambda s: s.name)
def test_partial_groups_are_written_as_equal_smaller_groups(scheme):
    """576 = 4 x 128 + 64 in masquant becomes 9 groups of 64 with repeated scales: the same weight, exactly."""
    W = torch.randn(16, 112, generator=torch.Generator().manual_seed(0))  # 112 = 2 x 48 + 16: gcd 16
    W_q, scale, zero = quantize_weight_grid(W, scheme)
    lin = QuantLinear(W_q, None, scheme, weight_scale=scale, weight_zero=zero)
    codes = integer_codes(lin)
    g, s2, z2 = uniform_groups(lin)
    assert 112 % g == 0 and g <= scheme.w_group_size
    per_col = s2.repeat_interleave(g, 1)
    back = codes * per_col if z2 is None else (codes - z2.repeat_interleave(g, 1)) * per_col
    assert torch.equal(back, W_q)


def test_a_weight_off_its_recorded_grid_is_refused():
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    W_q, scale, zero = quantize_weight_grid(W, W4_G32)
    lin = QuantLinear(W_q + 1e-3, None, W4_G32, weight_scale=scale, weight_zero=zero)
    with pytest.raises(ConfigError, match="not \\(code - zero\\) x scale"):
        integer_codes(lin)


# --- the round trip ----------------------------------------------------------------------------------------------
ROUND_TRIPS = [  # (method, scheme, method options)
    ("rtn", W4_G48_ASYM, {}),
    ("rtn", W3_G32_ASYM, {}),
    ("rtn", W8A8, {}),
    ("rtn", W4A8, {}),
    ("awq", W4_G32, {}),
    ("smoothquant", W8A8_STATIC, {}),
    ("mquant", W8A8_STATIC, {"online_down": False}),  # its offline rotation and per-modality scales (text path)
    ("mquant", W8A8_STATIC, {"online_down": False, "quantize_vision": True}),  # the vision tower quantized too
    ("masquant", W4A8, {"epochs": 1, "tie_scales": True}),
]


@pytest.mark.parametrize("method,scheme,options", ROUND_TRIPS,
                         ids=[f"{m}-{s.name}-{i}" for i, (m, s, _) in enumerate(ROUND_TRIPS)])
def test_reloaded_checkpoint_computes_the_deployable_model(qwen, tmp_path, method, scheme, options):
    base, processor, cls, held = qwen
    model = quantized(base, processor, cls, method, scheme, **options)
    _, folder, loaded = export_and_reload(model, processor, cls, tmp_path)
    check = compare(batch_logits(model, held, "cpu"), batch_logits(loaded, held, "cpu"))
    assert check["max_rel_diff"] <= 1e-6, check
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and "lm_head" in qc["ignore"]
    vision_ignored = any("visual.blocks" in name for name in qc["ignore"])
    assert vision_ignored != options.get("quantize_vision", False)  # full precision unless the method quantized it


@pytest.mark.parametrize("scheme", [W4_G48_ASYM, W3_G32_ASYM], ids=lambda s: s.name)
def test_a_bfloat16_checkpoint_reproduces_the_model_cast_to_bfloat16(qwen, tmp_path, scheme):
    """export.dtype=bfloat16 (weight-only): floating tensors in bf16, scales in float32; the reload computes the cast
    model exactly. (With quantized activations the format rounds them in bf16 its own way: recorded, not equal.)"""
    from masquant.export.runner import cast_keeping_grids_

    base, processor, cls, held = qwen
    model = quantized(base, processor, cls, "rtn", scheme)
    make_deployable_(model, get_adapter(model))
    cast_keeping_grids_(model, torch.bfloat16)
    write_folder(model, processor, tmp_path / "model")
    loaded = load_checkpoint(cls.model_cls(), tmp_path / "model", torch.bfloat16)
    check = compare(batch_logits(model, held, "cpu"), batch_logits(loaded, held, "cpu"))
    assert check["max_rel_diff"] <= 1e-6, check
    assert next(loaded.parameters()).dtype == torch.bfloat16


def test_a_checkpoint_that_computes_something_else_fails_the_export(qwen, tmp_path):
    from types import SimpleNamespace

    from masquant.export.runner import ExportMismatch, reload_and_compare

    base, processor, cls, held = qwen
    model = quantized(base, processor, cls, "rtn", W4_G32)
    make_deployable_(model, get_adapter(model))
    write_folder(model, processor, tmp_path / "model")
    options = SimpleNamespace(max_rel_diff=1e-6)
    check, _ = reload_and_compare(model, tmp_path / "model", held, "cpu", options, exact=True)
    assert check["max_rel_diff"] <= 1e-6
    with torch.no_grad():
        get_adapter(model).final_norm().weight.mul_(1.001)  # what the folder holds is no longer the model
    with pytest.raises(ExportMismatch, match="differ from the in-memory model's"):
        reload_and_compare(model, tmp_path / "model", held, "cpu", options, exact=True)


@pytest.mark.parametrize("scheme", [W8A8, W8A8_STATIC], ids=lambda s: s.name)
def test_reloaded_checkpoint_quantizes_activations(qwen, tmp_path, scheme):
    """The reload quantizes activations as the run did: without them the logits would differ."""
    base, processor, cls, held = qwen
    method = "rtn" if scheme.a_dynamic else "smoothquant"
    model = quantized(base, processor, cls, method, scheme)
    _, _, loaded = export_and_reload(model, processor, cls, tmp_path)
    reloaded = batch_logits(loaded, held, "cpu")
    for lin in model.modules():
        if isinstance(lin, QuantLinear):
            lin.quantize_inputs = False
    weights_only = batch_logits(model, held, "cpu")
    assert compare(weights_only, reloaded)["max_rel_diff"] > 1e-4


def test_mbq_round_trips(qwen, tmp_path):
    """MBQ (calibration rows with answers): its folded scales and clipped weights, written and reloaded exactly."""
    from masquant.calibration.cache import StatsCache
    from masquant.engine.context import QuantContext
    from masquant.methods.registry import build_method
    from masquant.quant import ModalityRouter, attach_router
    from support.tiny import calib_set

    base, processor, cls, held = qwen
    model = copy.deepcopy(base)
    adapter = get_adapter(model)
    router = ModalityRouter(adapter.modality_masks)
    attach_router(model, router)
    ctx = QuantContext(model, adapter, W4_G32, router, torch.device("cpu"), ("text", "vision"),
                       calib_set(processor, cls, 3), cache=StatsCache(None))
    build_method(get_config_class("mbq")()).run(ctx)
    _, _, loaded = export_and_reload(model, processor, cls, tmp_path)
    check = compare(batch_logits(model, held, "cpu"), batch_logits(loaded, held, "cpu"))
    assert check["max_rel_diff"] <= 1e-6, check


def test_gptq_act_order_with_static_groups_round_trips_and_permuted_groups_are_refused(qwen, tmp_path):
    base, processor, cls, held = qwen
    opts = dict(w_granularity="group", w_group_size=32, w_quantizer="gptq", gptq_act_order=True)
    model = quantized(base, processor, cls, "rtn", QuantScheme("gptq_static", 4, 16, gptq_static_groups=True, **opts))
    _, folder, loaded = export_and_reload(model, processor, cls, tmp_path)
    check = compare(batch_logits(model, held, "cpu"), batch_logits(loaded, held, "cpu"))
    assert check["max_rel_diff"] <= 1e-6, check
    groups = json.loads((folder / "config.json").read_text())["quantization_config"]["config_groups"]
    assert {g["weights"]["actorder"] for g in groups.values()} == {"weight"}
    permuted = quantized(base, processor, cls, "rtn", QuantScheme("gptq_perm", 4, 16, **opts))
    with pytest.raises(ConfigError, match=r"gptq_static_groups=true.*\(linear model\.language_model\.layers\.0\."):
        write_folder(permuted, processor, tmp_path / "refused")


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_round_trip_on_every_family(tmp_path, model_type):
    base, processor, cls = tiny(model_type)
    held = prompts(processor, cls, 1, seed=3)
    model = quantized(base, processor, cls, "rtn", W4_G32)
    _, _, loaded = export_and_reload(model, processor, cls, tmp_path)
    check = compare(batch_logits(model, held, "cpu"), batch_logits(loaded, held, "cpu"))
    assert check["max_rel_diff"] <= 1e-6, (model_type, check)


# --- what the format cannot hold ---------------------------------------------------------------------------------
def test_masquant_lora_adapter_reproduces_the_cmc_branch(qwen, tmp_path):
    """base + PEFT adapter: on the exported linear's input, the adapter adds the in-memory branch (x/s_m) L1 L2."""
    from masquant.export.lora import write_adapters

    base, processor, cls, _ = qwen
    model = quantized(base, processor, cls, "masquant", W4A8, epochs=1, tie_scales=True)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    branches = {n: (m.paths["vision"].smooth, m.paths["vision"].L1, m.paths["vision"].L2)
                for n, m in linears.items() if "vision" in m.paths and m.paths["vision"].L1 is not None}
    assert branches
    report, folder, _ = export_and_reload(model, processor, cls, tmp_path)
    assert report.folded  # q/k/v and gate/up: their shared text smoothing went into the norms
    written = write_adapters(report.branches, report.input_smoothing, tmp_path)
    from transformers.utils.quantization_config import CompressedTensorsConfig

    dense = cls.model_cls().from_pretrained(folder, dtype=torch.float32,
                                            quantization_config=CompressedTensorsConfig(dequantize=True))
    with_adapter = peft.PeftModel.from_pretrained(dense, str(tmp_path / written["vision"]["folder"]))
    g = torch.Generator().manual_seed(0)
    for name, (s_m, L1, L2) in branches.items():
        x = torch.randn(5, L1.shape[0], generator=g)  # the linear's input in the FP model
        expected = ((x if s_m is None else x / s_m) @ L1) @ L2
        module = with_adapter.base_model.model.get_submodule(name)
        s_in = report.input_smoothing.get(name)
        x_in = x if s_in is None else x / s_in  # what the exported linear receives
        got = module.lora_B["default"](module.lora_A["default"](x_in)) * module.scaling["default"]
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_folded_smoothing_keeps_what_each_linear_computes(qwen):
    """Tied text smoothing folded into the norms: norm -> q, k, gate, up compute what they computed in memory; v's
    outputs come out divided by the vector it absorbed for o_proj (per key-value head: the tiny model has GQA)."""
    from masquant.quant.quantizer import sqnr_db

    base, processor, cls, _ = qwen
    model = quantized(base, processor, cls, "masquant", W4A8, epochs=1, tie_scales=True)
    adapter = get_adapter(model)
    layer = adapter.decoder_layers()[0]
    names = adapter.linear_names(0)
    adapter.linears(layer)["q"].router.set_masks(None)  # direct calls: every token on the text path
    pairs = {p.name: p for p in adapter.norm_fold_pairs(layer)}
    x = torch.randn(6, base.config.text_config.hidden_size, generator=torch.Generator().manual_seed(2))
    before = {}
    for pair in pairs.values():
        norm, lin = copy.deepcopy(adapter.norm(layer, pair.producer)), copy.deepcopy(adapter.linears(layer))
        before[pair.name] = [lin[r](norm(x)) for r in pair.consumers]
    v_out, o_in = adapter.linears(layer)["v"].out_features, adapter.linears(layer)["o"].in_features
    assert o_in > v_out  # grouped-query attention
    report = make_deployable_(model, adapter)
    assert report.folded[names["o"]] == names["v"] and names["o"] in report.rerounded
    c_o = report.input_smoothing[names["o"]]  # [o_in]: v's vector as o's input channels see it
    c_v = c_o.reshape(-1, o_in // v_out, adapter.head_dim())[:, 0].reshape(-1)
    for name, pair in pairs.items():
        after = [adapter.linears(layer)[r](adapter.norm(layer, pair.producer)(x)) for r in pair.consumers]
        for role, y0, y1 in zip(pair.consumers, before[name], after):
            assert names[role] in report.folded and names[role] not in report.rerounded
            y1 = y1 * c_v if role == "v" else y1
            assert sqnr_db(y0, y1) > 50, (name, role)


def test_a_key_value_head_vector_reaches_o_proj_in_repeat_kv_layout():
    """v_proj's channel kv·d feeds o_proj's channels (kv·rep + j)·d: the layout transformers' repeat_kv gives."""
    from masquant.export.deployable import FoldGroup

    n_kv, rep, hd = 2, 3, 4
    group = FoldGroup("v", ("o",), False, rep, hd)
    s_o = torch.rand(n_kv * rep * hd, generator=torch.Generator().manual_seed(0)) + 0.5
    c = group.common([s_o])
    assert c.shape == (n_kv * hd,)
    y_v = torch.randn(5, n_kv * hd)
    repeat_kv = lambda y: y.reshape(5, n_kv, 1, hd).expand(5, n_kv, rep, hd).reshape(5, -1)  # noqa: E731
    torch.testing.assert_close(repeat_kv(y_v / c), repeat_kv(y_v) / group.expand(c))
    tied = group.expand(torch.rand(n_kv * hd) + 0.5)  # a vector constant over the shared heads folds exactly
    torch.testing.assert_close(group.common([tied]), tied.reshape(n_kv, rep, hd)[:, 0].reshape(-1))


def test_unfoldable_smoothing_is_refused_by_name_when_asked(qwen):
    base, processor, cls, _ = qwen
    model = quantized(base, processor, cls, "masquant", W4A8, epochs=1)  # untied scales: q, k, v differ
    with pytest.raises(ConfigError, match=r"export.unfoldable_smoothing=refuse: .*q_proj"):
        make_deployable_(model, get_adapter(model), "refuse")


def test_a_low_rank_product_on_every_token_is_refused(qwen):
    """MQuant's RMS keeps an FP rank-1 product on the default path: no place for it in the checkpoint."""
    from masquant.quant.linear import DEFAULT_PATH, ModalityPath

    base, processor, cls, _ = qwen
    model = quantized(base, processor, cls, "rtn", W4A8)
    lin = get_adapter(model).linears(get_adapter(model).decoder_layers()[1])["down"]
    lin.paths[DEFAULT_PATH] = ModalityPath(L1=torch.zeros(lin.in_features, 1), L2=torch.zeros(1, lin.out_features))
    with pytest.raises(ConfigError, match=r"low-rank product on every token .*layers\.1\.mlp\.down_proj"):
        make_deployable_(model, get_adapter(model))


def test_narrow_activations_and_rotations_are_refused_before_loading(compose_cfg, tiny_overrides):
    from masquant.app.pipeline import resolve

    with pytest.raises(ConfigError, match="quant.int_range=narrow"):
        resolve(compose_cfg(*tiny_overrides, "method=rtn", "quant=w4a8", "export=compressed_tensors"))
    with pytest.raises(ConfigError, match="method=quarot.*Hadamard"):
        resolve(compose_cfg(*tiny_overrides, "method=quarot", "quant=w4a16_g128", "export=compressed_tensors"))
    with pytest.raises(ConfigError, match="method=mquant.*method.online_down=false"):
        resolve(compose_cfg(*tiny_overrides, "method=mquant", "quant=w8a8", "quant.int_range=full",
                            "quant.a_dynamic=false", "quant.a_granularity=tensor", "export=compressed_tensors"))
    with pytest.raises(ConfigError, match="weights are not quantized"):
        resolve(compose_cfg(*tiny_overrides, "method=dense", "quant=fp16", "export=compressed_tensors"))


def test_the_common_vector_is_finite_with_signed_factors_and_untied_consumers_fold_nothing():
    """Learned smoothing factors may be negative (|s| floored, sign kept): o_proj's per-key-value-head vector stays
    finite and keeps the heads' shared factor where they agree; consumers with different vectors fold nothing."""
    from masquant.export.deployable import FoldGroup

    g = torch.Generator().manual_seed(0)
    s_o = torch.rand(2 * 3 * 4, generator=g) + 0.5
    s_o[1] = -s_o[1]  # a negative factor
    s_o.view(2, 3, 4)[:, :, 2] = -1.7  # channel 2 of every head: the same (negative) factor
    c = FoldGroup("v", ("o",), False, 3, 4).common([s_o])
    assert c.shape == (8,) and torch.isfinite(c).all() and bool((c != 0).all())
    torch.testing.assert_close(c.view(2, 4)[:, 2], torch.tensor([-1.7, -1.7]))
    untied = [torch.rand(8, generator=g) + 0.5 for _ in range(3)]
    assert FoldGroup("norm", ("q", "k", "v"), True).common(untied) is None
    assert torch.equal(FoldGroup("norm", ("q", "k", "v"), True).common([untied[0]] * 3), untied[0])


def test_non_finite_logits_count_as_a_difference():
    a = [torch.ones(1, 3, 5)]
    assert compare(a, [torch.full((1, 3, 5), float("nan"))])["max_rel_diff"] == float("inf")
    assert compare(a, [torch.ones(1, 3, 5)])["max_rel_diff"] == 0.0
