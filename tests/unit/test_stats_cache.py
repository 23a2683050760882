import torch

from masquant.adapters import get_adapter
from masquant.calibration.cache import StatsCache
from masquant.calibration.data import CalibrationDataError, CalibrationSet
from masquant.calibration.stats import ChannelStats
from masquant.engine.context import QuantContext
from masquant.quant import ModalityRouter, QuantScheme
from support.tiny import prompts, text_prompt, tiny

import pytest


def test_running_stats_equal_batch_stats():
    torch.manual_seed(0)
    xs = [torch.randn(7, 6) * (i + 1) for i in range(4)]
    st = ChannelStats(6)
    for x in xs:
        st.update(x)
    allx = torch.cat(xs)
    assert torch.allclose(st.absmax, allx.abs().amax(0))
    assert torch.allclose(st.mean_abs, allx.abs().mean(0), atol=1e-6)
    assert torch.equal(st.min, allx.amin(0)) and torch.equal(st.max, allx.amax(0))
    assert torch.equal(st.range, allx.amax(0) - allx.amin(0))
    assert st.count == 28


def _ctx(tmp_path, model, processor, cls):
    ad = get_adapter(model)
    calib = CalibrationSet(prompts(processor, cls, 3))
    return QuantContext(model, ad, QuantScheme("w4a8", 4, 8), ModalityRouter(ad.modality_masks), torch.device("cpu"),
                        ("text", "vision"), calib, StatsCache(tmp_path / "cache"), {"model": "tiny", "calib": 3})


def test_statistics_cache_second_run_loads_identical_values(tmp_path):
    model, processor, cls = tiny("qwen2_5_vl")
    ctx = _ctx(tmp_path, model, processor, cls)
    first = ctx.input_stats()
    assert ctx.cache.misses == 1 and ctx.cache.hits == 0
    ctx2 = _ctx(tmp_path, model, processor, cls)
    second = ctx2.input_stats()
    assert ctx2.cache.hits == 1 and ctx2.cache.misses == 0
    for l1, l2 in zip(first, second):
        for group in l1:
            for m in l1[group]:
                a, b = l1[group][m], l2[group][m]
                assert torch.equal(a.absmax, b.absmax) and torch.equal(a.abs_sum, b.abs_sum) and a.count == b.count
    # a walk that asks for statistics takes them from the cache, and makes them in its FP pass otherwise
    walked = [step.stats for step in ctx2.walk(stats=True)]
    assert ctx2.cache.hits == 2 and torch.equal(walked[1]["down"]["vision"].absmax, first[1]["down"]["vision"].absmax)
    # per-modality statistics partition the tokens
    s = first[0]["qkv"]
    assert s["text"].count + s["vision"].count == s["all"].count
    assert torch.equal(torch.maximum(s["text"].absmax, s["vision"].absmax), s["all"].absmax)
    # another calibration set -> another cache entry
    ctx3 = _ctx(tmp_path, model, processor, cls)
    ctx3.cache_key = {"model": "tiny", "calib": 4}
    ctx3.input_stats()
    assert ctx3.cache.misses == 1


def test_corrupt_cache_entry_is_moved_aside_and_recomputed(tmp_path):
    model, processor, cls = tiny("qwen2_5_vl")
    ctx = _ctx(tmp_path, model, processor, cls)
    first = ctx.input_stats()
    path = ctx.cache.path_for(ctx.stats_key())
    path.write_bytes(path.read_bytes()[:100])  # a truncated entry (a crash outside the atomic write, a full disk)
    ctx2 = _ctx(tmp_path, model, processor, cls)
    again = ctx2.input_stats()
    assert ctx2.cache.hits == 0 and ctx2.cache.misses == 1
    assert torch.equal(again[0]["qkv"]["all"].absmax, first[0]["qkv"]["all"].absmax)
    assert len(list(path.parent.glob(path.name + ".corrupt-*"))) == 1 and path.exists()


def test_calibration_without_requested_modality_is_a_clear_error():
    model, processor, _ = tiny("qwen2_5_vl")
    with pytest.raises(CalibrationDataError, match="no tokens of modality \\['vision'\\]"):
        CalibrationSet([text_prompt(processor)]).check_modalities_present(get_adapter(model), ("text", "vision"), "vision")


def test_model_fingerprint_follows_the_weights():
    from masquant.calibration.cache import model_fingerprint

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    before = model_fingerprint(model)
    assert model_fingerprint(model) == before
    with torch.no_grad():
        model[1].weight[0, 0] += 0.5
    assert model_fingerprint(model) != before
