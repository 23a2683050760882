import pytest
import torch
import torch.nn as nn

from masquant.adapters import ROLES, get_adapter, supported_model_types
from masquant.calibration.layerwise import capture_layer_inputs
from masquant.methods.base import QuantContext
from masquant.quant import ModalityRouter, QuantLinear, QuantScheme, attach_router
from masquant.registry import build_method
from masquant.testing import AUDIO_ID, IMAGE_ID, TINY_MODEL_TYPES, VIDEO_ID, tiny_model, tiny_qwen_vl_inputs, tiny_text_inputs
from baselines.rtn.method import RTNConfig


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_adapter_structure_on_tiny_real_class(model_type):
    model = tiny_model(model_type)
    ad = get_adapter(model)
    text = ad.text_config()
    assert ad.num_layers() == text.num_hidden_layers
    for layer in ad.decoder_layers():
        lin = ad.linears(layer)
        assert set(lin) == set(ROLES)
        assert all(isinstance(m, nn.Linear) for m in lin.values())
        assert lin["q"].in_features == text.hidden_size and lin["down"].in_features == text.intermediate_size
        for group in ad.norm_groups:
            norm = ad.norm(layer, group)
            assert norm.weight.shape == (text.hidden_size,)
            assert all(lin[r].in_features == text.hidden_size for r in group.roles)
    assert ad.embed_tokens().weight.shape[1] == text.hidden_size
    assert ad.lm_head().weight.shape[1] == text.hidden_size
    assert ad.final_norm().weight.shape == (text.hidden_size,)
    assert "vision" in ad.encoders()
    assert ad.modality_token_ids()["vision"][0] == IMAGE_ID


@pytest.mark.parametrize("model_type", TINY_MODEL_TYPES)
def test_rtn_runs_through_every_adapter(model_type):
    model = tiny_model(model_type)
    ad = get_adapter(model)
    batch = tiny_text_inputs()
    with torch.no_grad():
        ref = model(**batch).logits
    router = ModalityRouter(ad.modality_masks)
    attach_router(model, router)
    ctx = QuantContext(model, ad, QuantScheme("w8a8", 8, 8), router, torch.device("cpu"), ("text",))
    build_method(RTNConfig()).run(ctx)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 7 * ad.num_layers()
    with torch.no_grad():
        out = model(**batch).logits
    assert not torch.equal(out, ref)
    assert torch.allclose(out, ref, atol=0.1 * ref.abs().max())


def test_modality_masks_text_vision_audio_and_video_choice():
    ad = get_adapter(tiny_model("qwen2_5_omni_thinker"))
    ids = torch.tensor([[5, IMAGE_ID, IMAGE_ID, 7, AUDIO_ID, VIDEO_ID, 9]])
    m = ad.modality_masks(ids)
    assert m["vision"].tolist() == [[False, True, True, False, False, True, False]]
    assert m["audio"].tolist() == [[False, False, False, False, True, False, False]]
    assert m["text"].tolist() == [[True, False, False, True, False, False, True]]
    m_text_video = ad.modality_masks(ids, video_as="text")
    assert m_text_video["text"][0, 5] and not m_text_video["vision"][0, 5]
    with pytest.raises(ValueError, match="video_as"):
        ad.modality_masks(ids, video_as="audio")
    # every token belongs to exactly one modality
    assert (sum(v.long() for v in m.values()) == 1).all()


def test_unknown_model_type_names_supported_ones():
    model = tiny_model("qwen2_5_vl")
    model.config.model_type = "mystery_vlm"
    with pytest.raises(KeyError, match="qwen2_5_vl"):
        get_adapter(model)
    assert "qwen2_5_omni_thinker" in supported_model_types()


def test_qwen25vl_calibration_positions_match_generate():
    """Layer-0 inputs captured for calibration equal what generate's prefill passes (M-RoPE included)."""
    model = tiny_model("qwen2_5_vl")
    ad = get_adapter(model)
    batch = tiny_qwen_vl_inputs()
    seen = []

    def hook(module, args, kwargs):
        if not seen:
            seen.append({k: v for k, v in kwargs.items()})

    captured = capture_layer_inputs(model, ad, [batch], "cpu").samples[0]
    h = ad.decoder_layers()[0].register_forward_pre_hook(hook, with_kwargs=True)
    model.generate(**batch, max_new_tokens=1, do_sample=False)
    h.remove()
    cos_g, sin_g = seen[0]["position_embeddings"]
    cos_c, sin_c = captured.kwargs["position_embeddings"]
    assert torch.allclose(cos_g, cos_c) and torch.allclose(sin_g, sin_c)
    # without mm_token_type_ids Qwen2.5-VL silently falls back to 1-D positions: the inputs must carry it
    no_types = capture_layer_inputs(model, ad, [tiny_qwen_vl_inputs(with_mm_types=False)], "cpu").samples[0]
    assert not torch.allclose(no_types.kwargs["position_embeddings"][0], cos_c)


def test_full_omni_checkpoint_loads_as_thinker(tmp_path):
    import transformers as T

    from masquant.testing import tiny_config

    full = T.Qwen2_5OmniForConditionalGeneration(
        T.Qwen2_5OmniConfig(thinker_config=tiny_config("qwen2_5_omni_thinker").to_dict(), enable_audio_output=False))
    full.save_pretrained(tmp_path)
    from masquant.adapters.registry import adapter_class_for

    loader = adapter_class_for("qwen2_5_omni").load_pretrained
    thinker = loader(tmp_path, torch.float32)
    assert thinker.config.model_type == "qwen2_5_omni_thinker"
    ad = get_adapter(thinker)
    assert set(ad.supported_modalities()) == {"text", "vision", "audio"}
    ref = full.thinker.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in thinker.state_dict().items())
