"""MASQuant as a plugin on a model: exactness of CMC, invariance, decoding cost, learning, SQNR vs RTN.

The model under test comes from the ``mllm_case`` fixture: by default the tiny random Qwen2.5-VL with
a built-in modality gap. To run the same checks on the real testbed, override ``mllm_case`` in a
conftest with an :class:`MLLMCase` whose ``make_model`` loads it and whose batches come from the
testbed's calibration / held-out prompts.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy
from dataclasses import dataclass
from typing import Callable

import pytest
import torch

from baselines.rtn.method import RTNConfig
from masquant.adapters import get_adapter
from masquant.calibration.data import CalibrationSet
from masquant.engine.walker import capture_stack_inputs
from masquant.engine.context import QuantContext
from masquant.methods.masquant.analysis import channel_absmax, delta_w_rank_report, stream_sqnr
from masquant.reporting.plots import plot_channel_absmax
from masquant.methods.masquant.config import CMCConfig, MASQuantConfig
from masquant.quant import ModalityRouter, QuantLinear, QuantScheme, attach_router
from masquant.quant.quantizer import quantize_activation, sqnr_db
from masquant.methods.registry import build_method
from support.tiny import prompts, text_prompt, tiny

W4A8 = QuantScheme("w4a8", 4, 8)
FP = QuantScheme("fp16")
VISION_CHANNELS = [3, 17, 40, 51]
TEXT_CHANNELS = [8, 29, 44, 60]


@dataclass
class MLLMCase:
    make_model: Callable[[], torch.nn.Module]  # a fresh FP model each call
    calib_batches: list[dict]
    eval_batches: list[dict]
    modalities: tuple[str, ...] = ("text", "vision")
    text_batch: dict | None = None


def tiny_gap_model(gap: float = 20.0) -> torch.nn.Module:
    """Tiny Qwen2.5-VL whose text and vision tokens have different outlier channels (the modality gap)."""
    model, _, _ = tiny("qwen2_5_vl")
    with torch.no_grad():
        merger_out = model.model.visual.merger.mlp[-1]
        merger_out.weight[VISION_CHANNELS] *= gap
        merger_out.bias[VISION_CHANNELS] *= gap
        model.model.language_model.embed_tokens.weight[:, TEXT_CHANNELS] *= gap
    return model


@pytest.fixture(scope="module")
def mllm_case() -> MLLMCase:
    base = tiny_gap_model()
    _, processor, cls = tiny("qwen2_5_vl")
    return MLLMCase(
        make_model=lambda: copy.deepcopy(base),
        calib_batches=prompts(processor, cls, 4, seed=0),
        eval_batches=prompts(processor, cls, 3, seed=100),
        text_batch=text_prompt(processor, seed=5),
    )


def quantize(case: MLLMCase, cfg, scheme=W4A8, extra_batches=()):
    model = case.make_model()
    adapter = get_adapter(model)
    router = ModalityRouter(adapter.modality_masks)
    attach_router(model, router)
    calib = CalibrationSet(list(case.calib_batches) + list(extra_batches))
    ctx = QuantContext(model, adapter, scheme, router, torch.device("cpu"), case.modalities, calib)
    method = build_method(cfg)
    if not scheme.is_dense:
        method.check(scheme, case.modalities)
    report = method.run(ctx)
    return model, adapter, report


@torch.no_grad()
def final_hidden(model, batches):
    return [model(**b, output_hidden_states=True).hidden_states[-1][0] for b in batches]


def modality_sqnr(adapter, batches, ref, out) -> dict[str, float]:
    result = {}
    for m in ("text", "vision"):
        masks = [adapter.modality_masks(b["input_ids"])[m][0] for b in batches]
        a = torch.cat([h[mk] for h, mk in zip(ref, masks)])
        b = torch.cat([h[mk] for h, mk in zip(out, masks)])
        result[m] = sqnr_db(a, b)
    return result


def lowrank_tokens(model) -> int:
    return sum(m.lowrank_tokens for m in model.modules() if isinstance(m, QuantLinear))


# --- exactness and invariance ----------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", [W4A8, QuantScheme("w4a16", 4, 16)], ids=lambda s: s.tag)
def test_full_rank_cmc_gives_vision_tokens_the_exact_smoothed_weight(mllm_case, scheme):
    """rank 1.0, unquantized target: vision rows get Qa(X/s_v) W_qᵀ + (X/s_v)(diag(s_v)W − W_q), i.e. their
    weight is exactly diag(s_v) W; with unquantized activations (A16) that is the FP linear itself."""
    fp = mllm_case.make_model()
    cfg = MASQuantConfig(learn=False, cmc=CMCConfig(rank_ratio=1.0, rank_floor=0))
    model, adapter, report = quantize(mllm_case, cfg, scheme)
    assert (report["cmc/rank_min"], report["cmc/rank_max"]) == (32, 64)  # k/v: min(64, 32); q, o, gate, up: 64
    for role in ("q", "k", "o", "up", "down"):  # down_proj: s = 1, its branch carries W - Q(W)
        ql = adapter.linears(adapter.decoder_layers()[1])[role]
        W = get_adapter(fp).linears(get_adapter(fp).decoder_layers()[1])[role]
        path = ql.paths["vision"]
        assert path.rank == min(W.weight.shape)
        ones = torch.ones(ql.in_features)
        s_v = path.smooth if path.smooth is not None else ones
        assert (path.smooth is None) == (role == "down")
        X = torch.randn(6, ql.in_features, generator=torch.Generator().manual_seed(1))
        ql.router.set_masks({"text": torch.zeros(6, dtype=torch.bool), "vision": torch.ones(6, dtype=torch.bool)})
        y = ql(X)
        Xs = X / s_v
        expected = quantize_activation(Xs, scheme) @ ql.weight.T + Xs @ (W.weight * s_v[None, :] - ql.weight).T
        if W.bias is not None:
            expected = expected + W.bias
        torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-4)
        if not scheme.quantize_acts:
            torch.testing.assert_close(y, W(X), rtol=1e-4, atol=1e-4)
        # text rows use the shared weight only
        ql.router.set_masks({"text": torch.ones(6, dtype=torch.bool), "vision": torch.zeros(6, dtype=torch.bool)})
        s_t = ql.paths["text"].smooth if ql.paths["text"].smooth is not None else ones
        yt = quantize_activation(X / s_t, scheme) @ ql.weight.T + (0 if W.bias is None else W.bias)
        torch.testing.assert_close(ql(X), yt, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "cfg",
    [
        MASQuantConfig(learn=False, cmc=CMCConfig(rank_ratio=1.0)),
        MASQuantConfig(learn=True, epochs=1, deploy="per_modality_weights"),
        MASQuantConfig(learn=False, uniform=True, tie_scales=True, cmc=CMCConfig(rank_ratio=1.0, whiten=False)),
    ],
    ids=["cmc_full_rank", "per_modality_learned", "uniform_plain_svd"],
)
def test_smoothing_is_invariant_without_quantization(mllm_case, cfg):
    fp = mllm_case.make_model()
    model, adapter, _ = quantize(mllm_case, cfg, FP)
    for b in mllm_case.eval_batches[:2]:
        with torch.no_grad():
            torch.testing.assert_close(model(**b).logits, fp(**b).logits, rtol=1e-4, atol=1e-4)
    assert all(isinstance(m, QuantLinear) for m in adapter.linears(adapter.decoder_layers()[0]).values())


@pytest.mark.parametrize("uniform", [False, True])
def test_tied_scales_are_learned_once_for_k_v_with_q_and_gate_with_up(mllm_case, uniform):
    """tie_scales (the official merged_scales): k and v deploy q's learned smoothing vectors, gate deploys up's, per
    modality; with uniform every modality shares one vector too."""
    model, adapter, report = quantize(mllm_case, MASQuantConfig(tie_scales=True, uniform=uniform, epochs=1, lr=5e-3))
    assert report["masquant/loss_epoch1/layer_0"] > 0
    for layer in adapter.decoder_layers():
        lin = adapter.linears(layer)
        for tied, owner in (("k", "q"), ("v", "q"), ("gate", "up")):
            for m, path in lin[owner].paths.items():
                assert torch.equal(lin[tied].paths[m].smooth, path.smooth), (tied, m)
        s = {m: p.smooth for m, p in lin["q"].paths.items()}
        assert not torch.equal(s["text"], lin["o"].paths["text"].smooth)  # o keeps its own
        if uniform:
            assert torch.equal(s["text"], s["vision"])


def test_check_refuses_fp16():
    from masquant.errors import MethodConfigError

    with pytest.raises(MethodConfigError, match="method=dense"):
        build_method(MASQuantConfig()).check(FP, ("text", "vision"))


# --- decoding -------------------------------------------------------------------------------------------
def test_decode_takes_text_path_without_lowrank_work(mllm_case):
    model, _, report = quantize(mllm_case, MASQuantConfig(learn=False))
    assert report["cmc/extra_params"] > 0
    base = lowrank_tokens(model)  # rows of the calibration walk
    counts = []
    handle = model.register_forward_hook(lambda *_: counts.append(lowrank_tokens(model)))
    batch = mllm_case.eval_batches[0]
    with torch.no_grad():
        model.generate(**batch, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    handle.remove()
    counts = [c - base for c in counts]
    n_vision = int(get_adapter(model).modality_masks(batch["input_ids"])["vision"].sum())
    assert len(counts) == 4  # prefill + 3 decode steps
    assert counts[0] == n_vision * 7 * 2  # every linear of both layers (CMC roles) saw each image token once
    assert counts[1:] == [counts[0]] * 3  # decode steps add no low-rank rows
    with torch.no_grad():
        model(**mllm_case.text_batch)
    assert lowrank_tokens(model) - base == counts[0]  # text-only input: no low-rank work either


# --- learning -------------------------------------------------------------------------------------------
def test_learning_lowers_block_loss_and_survives_text_only_sample(mllm_case):
    cfg = MASQuantConfig(learn=True, epochs=2)
    _, _, report = quantize(mllm_case, cfg, extra_batches=[mllm_case.text_batch])
    for i in range(2):
        first, last = report[f"masquant/loss_epoch1/layer_{i}"], report[f"masquant/loss_last_epoch/layer_{i}"]
        assert last < first, (i, first, last)
        assert 0 < report[f"masquant/loss_deployed/layer_{i}"] < float("inf")
        assert report[f"masquant/time_s/layer_{i}"] > 0
    assert report["mem/peak_mb"] > 0


def test_text_only_modality_set_degenerates_to_text_smoothing(mllm_case):
    case = MLLMCase(mllm_case.make_model, mllm_case.calib_batches, mllm_case.eval_batches, modalities=("text",),
                    text_batch=mllm_case.text_batch)
    model, adapter, report = quantize(case, MASQuantConfig(learn=False))
    assert report["cmc/extra_params"] == 0
    ql = adapter.linears(adapter.decoder_layers()[0])["q"]
    assert list(ql.paths) == ["text"] and ql.paths["text"].smooth is not None
    with torch.no_grad():
        assert torch.isfinite(model(**case.eval_batches[0]).logits).all()


# --- end to end -----------------------------------------------------------------------------------------
def test_masquant_beats_rtn_per_modality(mllm_case):
    """W4A8: MAS + CMC (defaults: learned scales, rank 0.2 with floor 32) vs RTN, SQNR of the last hidden
    state vs FP on held-out prompts. Measured on the tiny gap model (prompts of its real processor):
    RTN text 31.6 / vision 36.7 dB, MASQuant 34.2 / 45.6 dB."""
    fp = mllm_case.make_model()
    adapter = get_adapter(fp)
    ref = final_hidden(fp, mllm_case.eval_batches)
    rtn, _, _ = quantize(mllm_case, RTNConfig())
    mas, _, report = quantize(mllm_case, MASQuantConfig())
    s_rtn = modality_sqnr(adapter, mllm_case.eval_batches, ref, final_hidden(rtn, mllm_case.eval_batches))
    s_mas = modality_sqnr(adapter, mllm_case.eval_batches, ref, final_hidden(mas, mllm_case.eval_batches))
    assert s_mas["text"] > s_rtn["text"], (s_mas, s_rtn)
    assert s_mas["vision"] > s_rtn["vision"] + 1.0, (s_mas, s_rtn)
    assert report["cmc/rank_ratio"] == 0.2 and report["cmc/rank_min"] >= 32


# --- analysis helpers -----------------------------------------------------------------------------------
def test_analysis_helpers(mllm_case, tmp_path):
    fp = mllm_case.make_model()
    fp_adapter = get_adapter(fp)
    model, adapter, _ = quantize(mllm_case, MASQuantConfig(learn=False))
    calib = capture_stack_inputs(fp, fp_adapter.decoder_stack(), mllm_case.eval_batches, "cpu")
    per_layer = stream_sqnr(fp_adapter, adapter, calib, "cpu", adapter.linears(adapter.decoder_layers()[0])["q"].router)
    assert len(per_layer) == 2 and {"all", "text", "vision"} <= set(per_layer[0])
    assert all(10 < v < 80 for v in per_layer[0].values())
    absmax = channel_absmax(fp_adapter, 0, calib, "cpu", "qkv")
    assert set(absmax["vision"].topk(4).indices.tolist()) == set(VISION_CHANNELS)
    assert set(absmax["text"].topk(4).indices.tolist()) == set(TEXT_CHANNELS)
    png = plot_channel_absmax(absmax, tmp_path / "absmax.png", title="layer 0 qkv")
    assert png.stat().st_size > 1000
    X = torch.randn(200, 64, dtype=torch.float64) * torch.linspace(3, 0.05, 64, dtype=torch.float64)
    W = fp_adapter.linears(fp_adapter.decoder_layers()[0])["q"].weight.detach()
    rep = delta_w_rank_report(W, torch.ones(64), torch.rand(64) + 0.5, X, W4A8, ranks=(8,))
    assert 1 <= rep["erank/whitened"] <= 64 and 1 <= rep["erank/plain"] <= 64
    assert rep["rel_err/whitened/rank_8"] < rep["rel_err/plain/rank_8"]


def test_an_undamped_singular_whitening_stops_with_an_error_naming_the_damping():
    """cmc.damping=0 (the official undamped inverse) on a Gram matrix of fewer tokens than channels: the factors
    overflow; the run stops with an error naming method.cmc.damping instead of an SVD failure or infinite weights."""
    from masquant.errors import MethodConfigError
    from masquant.methods.masquant.config import CMCConfig, MASQuantConfig
    from masquant.methods.masquant.method import MASQuant
    from masquant.quant.quantizer import quantize_weight
    from masquant.quant.scheme import QuantScheme

    g = torch.Generator().manual_seed(0)
    W, X = torch.randn(32, 64, generator=g), torch.randn(8, 64, generator=g).double()  # 8 tokens < 64 channels
    s, scheme = torch.rand(64, generator=g) + 0.5, QuantScheme("a", 4, 8)
    W_q = quantize_weight(W * s, scheme)
    with pytest.raises(MethodConfigError, match="method.cmc.damping=0.0"):
        MASQuant(MASQuantConfig(cmc=CMCConfig(damping=0.0))).cmc_factors(W, s, W_q, X.T @ X, scheme)
    L1, L2 = MASQuant(MASQuantConfig()).cmc_factors(W, s, W_q, X.T @ X, scheme)  # damped: finite
    assert torch.isfinite(L1).all() and torch.isfinite(L2).all()
