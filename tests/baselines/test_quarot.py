"""QuaRot: every rotatable adapter, refusals, the KV-cache quantizer, the pipeline, and the testbed (slow)."""

from __future__ import annotations

import copy

import pytest
import torch

from baselines.quarot.core import KVQuantizer, kv_fake_quant, qk_hadamard
from baselines.quarot.method import QuaRot, QuaRotConfig
from masquant.adapters import adapter_class_for, get_adapter
from masquant.errors import MethodConfigError
from masquant.quant import QuantLinear, QuantScheme
from masquant.quant.quantizer import sqnr_db
from support.tiny import MODEL_TYPES, final_hidden, prompts, run_method, tiny

ROTATABLE = [t for t in MODEL_TYPES if adapter_class_for(t).supports_residual_rotation]
W8A8 = QuantScheme("w8a8", 8, 8)


def _run(model, cls, processor, cfg, scheme, n_calib=4):
    return run_method(model, cls, processor, cfg, scheme, n_calib)



@pytest.mark.parametrize("model_type", ROTATABLE)
def test_quarot_on_every_rotatable_adapter_at_w8a8(model_type):
    """The final hidden state (un-rotated) of QuaRot+GPTQ at W8A8 is close to FP: a wrong fold collapses it."""
    base, processor, cls = tiny(model_type)
    held = prompts(processor, cls, 2, seed=50)
    ref = final_hidden(base, held)
    model = copy.deepcopy(base)
    report, ctx = _run(model, cls, processor, QuaRotConfig(), QuantScheme("w8a8", 8, 8, w_quantizer="gptq"))
    Q = get_adapter(model).language_model().masquant_residual_basis.Q
    assert report["quant/linears"] == 7 * ctx.adapter.num_layers()
    assert sqnr_db(ref, final_hidden(model, held) @ Q.T) > 20
    down = ctx.adapter.linears(ctx.adapter.decoder_layers()[0])["down"]
    assert isinstance(down, QuantLinear) and down.input_transform is not None  # the online Hadamard survived deploy
    assert down.scheme.a_clip_ratio == 1.0  # QuaRot's recipe clips 4-bit activations only
    o = ctx.adapter.linears(ctx.adapter.decoder_layers()[0])["o"]
    assert o.input_transform is not None  # the online transform across heads (o_rotation=full) too


def test_activation_clip_follows_quarots_recipe_by_bit_width():
    """null: 0.9 at 4-bit activations (the W4A4 recipe), none at 8; a number: everywhere; the scheme's when set."""
    method = QuaRot(QuaRotConfig())
    assert method.deploy_scheme(QuantScheme("a", 4, 4)).a_clip_ratio == 0.9
    assert method.deploy_scheme(QuantScheme("a", 4, 8)).a_clip_ratio == 1.0
    assert method.deploy_scheme(QuantScheme("a", 8, 8, a_clip_ratio=0.95)).a_clip_ratio == 0.95
    assert QuaRot(QuaRotConfig(a_clip_ratio=0.8)).deploy_scheme(QuantScheme("a", 8, 8)).a_clip_ratio == 0.8
    assert method.deploy_scheme(QuantScheme("a", 4, 16)).a_clip_ratio == 1.0  # weight-only: nothing to clip


def test_gemma3_is_refused_with_a_method_config_error():
    model, processor, cls = tiny("gemma3")
    with pytest.raises(MethodConfigError, match="method=quarot: .*post_feedforward_layernorm"):
        _run(model, cls, processor, QuaRotConfig(), W8A8)


def test_check_refusals():
    method = QuaRot(QuaRotConfig())
    with pytest.raises(MethodConfigError, match="mquant"):
        method.check(QuantScheme("s", 8, 8, a_granularity="tensor", a_dynamic=False), ("text",))
    with pytest.raises(MethodConfigError, match="disagree"):
        QuaRot(QuaRotConfig(a_clip_ratio=0.9)).check(QuantScheme("c", 8, 8, a_clip_ratio=0.8), ("text",))
    QuaRot(QuaRotConfig(a_clip_ratio=None)).check(QuantScheme("c", 8, 8, a_clip_ratio=0.8), ("text",))
    with pytest.raises(MethodConfigError, match="method=dense"):
        method.check(QuantScheme("fp16"), ("text",))
    with pytest.raises(ValueError, match="kv_bits"):
        QuaRotConfig(kv_bits=1)


def test_kv_fake_quant_is_per_token_head_and_group():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 5, 64, generator=g)
    q = kv_fake_quant(x, 4, 32, 1.0)
    assert q.shape == x.shape and not torch.equal(q, x)
    # each (token, head, group of 32) has at most 16 levels; and quantizing one row alone gives the same row
    assert all(len(torch.unique(q[0, 1, 2, i:i + 32])) <= 16 for i in (0, 32))
    torch.testing.assert_close(kv_fake_quant(x[:1, :1, 2:3], 4, 32, 1.0), q[:1, :1, 2:3])
    assert torch.equal(kv_fake_quant(x, 16, 32, 1.0), x)
    qh, kh = qk_hadamard(x, x.flip(2))
    torch.testing.assert_close(qh @ kh.transpose(-1, -2), x @ x.flip(2).transpose(-1, -2), rtol=1e-5, atol=1e-5)


def test_kv_quantizer_sees_keys_after_rope_and_keeps_the_cache_consistent():
    model, processor, cls = tiny("qwen2_5_vl")
    adapter = get_adapter(model)
    batch = prompts(processor, cls, 1, seed=3)[0]
    with torch.no_grad():
        ref = model(**batch).logits
    seen = []

    def recorder(module, q, k, v, mask, kernel, **kw):
        seen.append(k)
        return kernel(module, q, k, v, mask, **kw)

    for layer in adapter.decoder_layers():
        adapter.wrap_attention_kernel_(layer, recorder)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref)  # the wrapper alone changes nothing
    assert len(seen) == adapter.num_layers() and seen[0].shape[-1] == adapter.head_dim()
    attn = adapter.attention(adapter.decoder_layers()[0])
    assert model.config.get_text_config()._attn_implementation == "sdpa"  # the model's masks are unchanged
    assert attn.config._attn_implementation == "masquant_wrapped"
    # 16 bits + the q/k Hadamard: exact; 4 bits: changes the output
    for layer in adapter.decoder_layers():
        adapter.wrap_attention_kernel_(layer, KVQuantizer(bits=16, k_hadamard=True))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, ref, rtol=1e-4, atol=1e-4)
    for layer in adapter.decoder_layers():
        adapter.wrap_attention_kernel_(layer, KVQuantizer(bits=4, group_size=8))
    with torch.no_grad():
        full = model(**batch).logits
        assert not torch.allclose(full, ref, atol=1e-3)
        # generation with the cache (prefill, then decoding steps) = the same tokens in one pass: the cache
        # stores FP keys and values, re-quantized identically at every step
        gen = model.generate(**batch, max_new_tokens=2, do_sample=False, output_logits=True, return_dict_in_generate=True)
        ids = gen.sequences[:, :-1]
        full = model(**{**batch, "input_ids": ids, "attention_mask": torch.ones_like(ids),
                        "mm_token_type_ids": torch.nn.functional.pad(batch["mm_token_type_ids"], (0, 1))}).logits
    torch.testing.assert_close(gen.logits[1][0], full[0, -1], rtol=1e-4, atol=1e-4)


def test_quarot_kv4_runs_and_generates():
    base, processor, cls = tiny("qwen2_5_vl")
    model = copy.deepcopy(base)
    report, _ = _run(model, cls, processor, QuaRotConfig(kv_bits=4), QuantScheme("w4a8", 4, 8))
    assert report["quarot/kv_bits"] == 4
    batch = prompts(processor, cls, 1, seed=9)[0]
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == batch["input_ids"].shape[1] + 3


def test_pipeline_end_to_end_on_the_tiny_model(compose_cfg, tiny_overrides):
    from masquant.app import pipeline
    from masquant.reporting.paper import parse_method_label

    m = pipeline.run(compose_cfg(*tiny_overrides, "method=quarot", "quant=w4a8", "quant.w_quantizer=gptq"))
    assert m["run/method_label"] == "quarot(w_quantizer=gptq)" and m["run/w_quantizer"] == "gptq"
    assert m["quarot/gptq_s_per_layer"] > 0 and m["quarot/a_clip_ratio"] == 1.0
    assert 0 < m["fidelity/sqnr/all/e2e"] < 80
    rtn = pipeline.run(compose_cfg(*tiny_overrides, "method=quarot", "quant=w4a8"))  # no calibration needed
    assert rtn["run/method_label"] == "quarot" and "quarot/gptq_s_per_layer" not in rtn
    mq = pipeline.run(compose_cfg(*tiny_overrides, "method=mquant", "method.msq=false", "quant=w4a8",
                                  "quant.a_dynamic=false", "quant.a_granularity=tensor", "quant.w_quantizer=gptq"))
    assert parse_method_label(mq["run/method_label"]) == ("mquant", {"msq": "False", "w_quantizer": "gptq"})


TESTBED = ["eval=fidelity"]


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["w4a8", "w4a4"])
def test_quarot_beats_rtn_on_the_testbed(compose_cfg, quant):
    """Measured once (16 calibration, 16 held-out samples; e2e SQNR text / vision dB, PPL; FP PPL 21.11):

    | W4A8 | RTN 2.40 / 8.25, 45.4 | QuaRot-RTN 1.61 / 6.93, 98.1 | QuaRot-GPTQ 11.77 / 21.30, 37.9 |
    | W4A4 | RTN -1.31 / 3.01, 4869 | QuaRot-RTN 0.56 / 5.57, 227 | QuaRot-GPTQ 3.08 / 10.15, 77.4 |

    QuaRot with its default GPTQ weights beats RTN everywhere; with RTN weights it wins at W4A4 (activation
    outliers) but loses at W4A8, where folding the norm scales into the 4-bit weights costs more than the
    rotation gives back at this model size. (Measured with 1 thread; the perplexity of GPTQ runs moves by up
    to ±5 with the thread count, so it is asserted only at W4A4.)
    """
    rtn = pipeline_run(compose_cfg, "method=rtn", f"quant={quant}")
    quarot = pipeline_run(compose_cfg, "method=quarot", f"quant={quant}", "quant.w_quantizer=gptq")
    for modality in ("text", "vision"):
        key = f"fidelity/sqnr/{modality}/e2e"
        assert quarot[key] > rtn[key] + 1.0, (modality, quarot[key], rtn[key])
    if quant == "w4a4":
        assert quarot["fidelity/ppl"] < rtn["fidelity/ppl"] / 10


def pipeline_run(compose_cfg, *overrides):
    from masquant.app import pipeline

    return pipeline.run(compose_cfg(*TESTBED, *overrides))


def test_cli_refuses_gemma3_with_a_configuration_error(compose_cfg, tiny_overrides):
    from masquant.app import pipeline
    from masquant.errors import ConfigError

    cfg = compose_cfg(*tiny_overrides, "model.tiny_type=gemma3", "method=quarot", "quant=w4a8")
    with pytest.raises(ConfigError, match="method=quarot: Gemma3Adapter cannot be rotated exactly"):
        pipeline.run(cfg)

