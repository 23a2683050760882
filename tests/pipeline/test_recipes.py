"""recipe=official: each method's official settings from conf/recipes, command-line overrides winning, a clear
error for a method without the preset, run labels that say the recipe; QuaRot's official preset at W8A8 is within
1 dB of RTN on every rotatable adapter family."""

from __future__ import annotations

import copy

import pytest

from masquant.app import pipeline
from masquant.app.recipes import methods_with_recipe
from masquant.errors import ConfigError


def _spec(compose_cfg, *overrides):
    return pipeline.resolve(compose_cfg(*overrides))


def test_quarot_official_preset_sets_the_official_flags(compose_cfg):
    spec = _spec(compose_cfg, "method=quarot", "recipe=official", "quant=w4a8")
    s = spec.scheme
    assert (s.w_quantizer.value, s.w_mse_clip, s.gptq_true_sequential, s.gptq_act_order) == ("gptq", True, True, False)
    assert spec.method_cfg.o_rotation.value == "full"
    assert pipeline.run_method_label(spec) == "quarot(recipe=official)"
    ours = _spec(compose_cfg, "method=quarot", "quant=w4a8")
    assert (ours.scheme.w_quantizer.value, ours.scheme.w_mse_clip) == ("rtn", False)  # the scheme's defaults
    assert pipeline.run_method_label(ours) == "quarot"


def test_overrides_win_over_the_preset_and_the_label_says_which(compose_cfg):
    """--w_rtn with the official clip: RTN weights, the MSE clip kept, the GPTQ-only options off by themselves."""
    spec = _spec(compose_cfg, "method=quarot", "recipe=official", "quant=w4a8", "quant.w_quantizer=rtn")
    s = spec.scheme
    assert (s.w_quantizer.value, s.w_mse_clip, s.gptq_true_sequential) == ("rtn", True, False)
    assert pipeline.run_method_label(spec) == "quarot(recipe=official,w_quantizer=rtn)"
    spec = _spec(compose_cfg, "method=quarot", "recipe=official", "quant=w4a8", "method.o_rotation=per_head")
    assert pipeline.run_method_label(spec) == "quarot(recipe=official,o_rotation=per_head)"


def test_mquant_official_preset(compose_cfg):
    spec = _spec(compose_cfg, "method=mquant", "recipe=official", "quant=w4a8")
    s, m = spec.scheme, spec.method_cfg
    assert (s.a_dynamic, s.a_granularity.value, s.gptq_act_order, s.gptq_true_sequential) == (False, "tensor", True, True)
    assert (m.scales.value, m.scale_new_tokens, m.vision_rms) == ("generation", 20, False)
    vision = _spec(compose_cfg, "method=mquant", "recipe=official", "quant=w4a8", "method.quantize_vision=true")
    assert vision.method_cfg.vision_rms is True  # --visual_split comes with the encoder
    assert pipeline.run_method_label(vision) == "mquant(recipe=official,quantize_vision=True)"


def test_a_method_without_the_preset_is_refused_naming_those_with_one(compose_cfg, tmp_path, monkeypatch):
    """Here the same recipes without MASQuant's: recipe=official is refused before anything loads."""
    import shutil

    from masquant.app import recipes

    assert {"quarot", "mquant", "awq", "rtn", "dense", "masquant"} <= set(methods_with_recipe("official"))
    cfg = compose_cfg("method=masquant", "recipe=official")
    copy_dir = tmp_path / "recipes"
    shutil.copytree(recipes.RECIPES_DIR, copy_dir)
    (copy_dir / "masquant-official.yaml").unlink()
    monkeypatch.setattr(recipes, "RECIPES_DIR", copy_dir)
    with pytest.raises(ConfigError, match=r"recipe=official: method=masquant has no official preset .*'quarot'"):
        pipeline.resolve(cfg)


def test_the_recipe_is_not_part_of_the_config_hash(compose_cfg):
    """The preset's values are: RTN (no options) runs once under either recipe."""
    from masquant.runs.hashing import config_hash

    assert config_hash(compose_cfg("method=rtn")) == config_hash(compose_cfg("method=rtn", "recipe=official"))
    assert config_hash(compose_cfg("method=quarot")) != config_hash(compose_cfg("method=quarot", "recipe=official"))


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "qwen2_vl", "qwen3_vl", "qwen2_5_omni_thinker", "idefics3",
                                        "llava"])
def test_quarot_official_preset_at_w8a8_is_within_1_db_of_rtn(compose_cfg, model_type):
    """The issue's bar, on every rotatable adapter family: QuaRot as its official recipe runs it (GPTQ true
    sequential with the MSE clip, full o_proj rotation, no activation clip at 8 bits) against RTN, W8A8."""
    from masquant.adapters import adapter_class_for, get_adapter
    from masquant.methods.registry import build_method
    from masquant.quant.quantizer import sqnr_db
    from support.tiny import final_hidden, prompts, run_method, tiny

    assert adapter_class_for(model_type).supports_residual_rotation
    official = _spec(compose_cfg, "method=quarot", "recipe=official", "quant=w8a8")
    rtn = _spec(compose_cfg, "method=rtn", "quant=w8a8")
    base, processor, cls = tiny(model_type)
    held = prompts(processor, cls, 2, seed=50)
    ref = final_hidden(base, held)
    sqnr = {}
    for name, spec in (("rtn", rtn), ("quarot", official)):
        model = copy.deepcopy(base)
        run_method(model, cls, processor, spec.method_cfg, spec.scheme, 4)
        out = final_hidden(model, held)
        basis = getattr(get_adapter(model).language_model(), "masquant_residual_basis", None)
        sqnr[name] = sqnr_db(ref, out if basis is None else out @ basis.Q.T)
    assert build_method(official.method_cfg).id == "quarot"
    assert sqnr["quarot"] > sqnr["rtn"] - 1.0, sqnr


@pytest.mark.parametrize("method,quant", [("smoothquant", "w8a8"), ("awq", "w4a16_g128"), ("mbq", "w4a8"),
                                          ("rtn", "w4a8"), ("larosa", "fp16")])
def test_these_methods_defaults_are_their_official_recipe(compose_cfg, method, quant):
    """The table experiments run these at their defaults: the same configuration (hash) as their official preset."""
    from masquant.runs.hashing import config_hash

    ours = compose_cfg(f"method={method}", f"quant={quant}")
    assert config_hash(ours) == config_hash(compose_cfg(f"method={method}", f"quant={quant}", "recipe=official"))


def test_masquant_official_preset_is_the_official_codes(compose_cfg):
    spec = _spec(compose_cfg, "method=masquant", "recipe=official", "quant=w4a8")
    m = spec.method_cfg
    assert (m.lambda_vision, list(m.cmc.roles), m.cmc.damping) == (0.5, ["q", "k", "v", "o", "gate", "up"], 0.01)
    assert pipeline.run_method_label(spec) == "masquant(recipe=official)"
