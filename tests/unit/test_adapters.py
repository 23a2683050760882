import pytest
import torch
import torch.nn as nn

from baselines.rtn.method import RTNConfig
from masquant.adapters import ROLES, adapter_class_for, get_adapter, supported_model_types
from masquant.engine.context import QuantContext
from masquant.quant import ModalityRouter, QuantLinear, QuantScheme, attach_router
from masquant.methods.registry import build_method
from support.tiny import MODEL_TYPES, prompts, text_prompt, tiny


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_adapter_structure_on_tiny_real_class(model_type):
    model, processor, cls = tiny(model_type)
    ad = get_adapter(model)
    text = ad.text_config()
    assert ad.num_layers() == text.num_hidden_layers
    for layer in ad.decoder_layers():
        lin = ad.linears(layer)
        assert set(lin) == set(ROLES)
        assert all(isinstance(m, nn.Linear) for m in lin.values())
        assert lin["q"].in_features == text.hidden_size and lin["down"].in_features == text.intermediate_size
        for pair in ad.fold_pairs(layer):
            assert all(lin[r].in_features == lin[pair.consumers[0]].in_features for r in pair.consumers)
            if pair.producer_is_norm:
                assert ad.norm(layer, pair.producer).weight.shape == (text.hidden_size,)
        assert ad.attention(layer) is not None and ad.mlp(layer) is not None
    assert ad.embed_tokens().weight.shape[1] == text.hidden_size
    assert ad.lm_head().weight.shape[1] == text.hidden_size
    assert ad.final_norm().weight.shape == (text.hidden_size,)
    assert "vision" in ad.encoders()
    batch = prompts(processor, cls, 1)[0]
    vision_id = ad.modality_token_ids()["vision"][0]
    assert int((batch["input_ids"] == vision_id).sum()) >= 4  # the real processor expanded the image


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_rtn_runs_through_every_adapter(model_type):
    model, processor, _ = tiny(model_type)
    ad = get_adapter(model)
    batch = text_prompt(processor)
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
    model, processor, cls = tiny("qwen2_5_omni_thinker")
    ad = get_adapter(model)
    image, video, audio = (ad.modality_token_ids()["vision"][0], ad.modality_token_ids()["vision"][1],
                           ad.modality_token_ids()["audio"][0])
    ids = torch.tensor([[250, image, image, 251, audio, video, 252]])
    m = ad.modality_masks(ids)
    assert m["vision"].tolist() == [[False, True, True, False, False, True, False]]
    assert m["audio"].tolist() == [[False, False, False, False, True, False, False]]
    assert m["text"].tolist() == [[True, False, False, True, False, False, True]]
    m_text_video = ad.modality_masks(ids, video_as="text")
    assert m_text_video["text"][0, 5] and not m_text_video["vision"][0, 5]
    with pytest.raises(ValueError, match="video_as"):
        ad.modality_masks(ids, video_as="audio")
    assert (sum(v.long() for v in m.values()) == 1).all()
    # a real prompt with an image and an audio clip: each placeholder token is marked, once
    batch = prompts(processor, cls, 1)[0]
    masks = ad.modality_masks(batch["input_ids"])
    assert masks["vision"].sum() > 0 and masks["audio"].sum() > 0
    assert (sum(v.long() for v in masks.values()) == 1).all()


def test_unknown_model_type_names_supported_ones():
    model, _, _ = tiny("qwen2_5_vl")
    model.config.model_type = "mystery_vlm"
    with pytest.raises(KeyError, match="qwen2_5_vl"):
        get_adapter(model)
    assert {"qwen2_5_omni_thinker", "gemma3", "qwen3_vl"} <= set(supported_model_types())


def test_full_omni_checkpoint_loads_as_thinker(tmp_path):
    import transformers as T

    cls = adapter_class_for("qwen2_5_omni_thinker")
    thinker_config = cls.tiny_config(cls.tiny_processor().tokenizer)
    full = T.Qwen2_5OmniForConditionalGeneration(
        T.Qwen2_5OmniConfig(thinker_config=thinker_config.to_dict(), enable_audio_output=False))
    full.save_pretrained(tmp_path)
    thinker = adapter_class_for("qwen2_5_omni").load_pretrained(tmp_path, torch.float32)
    assert thinker.config.model_type == "qwen2_5_omni_thinker"
    ad = get_adapter(thinker)
    assert set(ad.supported_modalities()) == {"text", "vision", "audio"}
    ref = full.thinker.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in thinker.state_dict().items())
