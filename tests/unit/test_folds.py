"""Folds are exact for every adapter and norm kind: random scales leave the FP logits unchanged."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from masquant.adapters import NormKind, get_adapter
from masquant.adapters.norms import fold_scales_into_norm_, probe_norm_kind, scale_linear_inputs_
from support.tiny import MODEL_TYPES, prompts, tiny


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_declared_norm_kind_is_what_the_norms_compute(model_type):
    model, _, _ = tiny(model_type)
    adapter = get_adapter(model)
    layer = adapter.decoder_layers()[0]
    for pair in adapter.norm_fold_pairs(layer):
        assert probe_norm_kind(adapter.norm(layer, pair.producer)) == adapter.norm_kind, pair


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_random_scales_at_every_fold_pair_leave_logits_unchanged(model_type):
    model, processor, cls = tiny(model_type)
    adapter = get_adapter(model)
    batch = prompts(processor, cls, 1, seed=5)[0]
    with torch.no_grad():
        ref = model(**batch).logits
    g = torch.Generator().manual_seed(0)
    names = set()
    for layer in adapter.decoder_layers():
        for pair in adapter.fold_pairs(layer):
            dim = adapter.linears(layer)[pair.consumers[0]].in_features
            s = torch.rand(dim, generator=g) * 4 + 0.25
            adapter.fold_scales_(layer, pair, s)
            names.add(pair.name)
    assert {"attn_in", "mlp_in", "up_down"} <= names
    with torch.no_grad():
        out = model(**batch).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_v_o_pair_only_without_grouped_query_attention():
    model, _, _ = tiny("qwen2_5_vl")  # 4 heads, 2 KV heads: v's output is half of o's input
    adapter = get_adapter(model)
    assert "v_o" not in {p.name for p in adapter.fold_pairs(adapter.decoder_layers()[0])}
    from transformers import LlavaForConditionalGeneration

    from masquant.adapters import adapter_class_for

    cls = adapter_class_for("llava")
    proc = cls.tiny_processor()
    config = cls.tiny_config(proc.tokenizer)
    config.text_config.num_key_value_heads = config.text_config.num_attention_heads
    torch.manual_seed(0)
    mha = LlavaForConditionalGeneration(config).eval()
    ad = get_adapter(mha)
    assert "v_o" in {p.name for p in ad.fold_pairs(ad.decoder_layers()[0])}
    batch = prompts(proc, cls, 1)[0]
    with torch.no_grad():
        ref = mha(**batch).logits
    for layer in ad.decoder_layers():
        (pair,) = [p for p in ad.fold_pairs(layer) if p.name == "v_o"]
        ad.fold_scales_(layer, pair, torch.rand(ad.linears(layer)["o"].in_features) + 0.5)
    with torch.no_grad():
        torch.testing.assert_close(mha(**batch).logits, ref, rtol=1e-4, atol=1e-4)


class _OnePlusRMSNorm(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d) * 0.1)
        self.eps = 1e-6

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


class _RMSNorm(_OnePlusRMSNorm):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


@pytest.mark.parametrize("kind,make", [
    (NormKind.rms, lambda d: _RMSNorm(d)),
    (NormKind.rms_one_plus, lambda d: _OnePlusRMSNorm(d)),
    (NormKind.layer, lambda d: nn.LayerNorm(d)),
])
def test_norm_fold_is_exact_for_each_kind(kind, make):
    torch.manual_seed(0)
    d = 16
    norm, linear = make(d), nn.Linear(d, 8)
    if kind == NormKind.layer:
        with torch.no_grad():
            norm.weight.copy_(torch.rand(d) + 0.5)
            norm.bias.copy_(torch.randn(d))
    assert probe_norm_kind(norm) == kind
    x = torch.randn(5, d) * 3
    ref = linear(norm(x))
    s = torch.rand(d) * 4 + 0.25
    fold_scales_into_norm_(norm, kind, s)
    scale_linear_inputs_(linear, s)
    torch.testing.assert_close(linear(norm(x)), ref, rtol=1e-5, atol=1e-5)


def test_wrong_fold_for_gemma_norm_would_change_outputs():
    """The plain-RMSNorm fold (w / s) on a (1 + w) norm is not function-preserving: the kind matters."""
    torch.manual_seed(0)
    norm, linear = _OnePlusRMSNorm(16), nn.Linear(16, 8)
    x = torch.randn(5, 16)
    ref = linear(norm(x))
    s = torch.rand(16) * 4 + 0.25
    fold_scales_into_norm_(norm, NormKind.rms, s)
    scale_linear_inputs_(linear, s)
    assert not torch.allclose(linear(norm(x)), ref, atol=1e-2)
