"""Tiny randomly initialised models of the real architectures (for tests and quick experiments).

No downloads: configs are built in code. Inputs are built by hand with the right placeholder
tokens, pixel values and (for Qwen) ``mm_token_type_ids``, so no tokenizer is needed.
"""

from __future__ import annotations

import torch
import transformers as T

VOCAB = 320
IMAGE_ID, VIDEO_ID, AUDIO_ID, VSTART_ID, VEND_ID = 300, 301, 302, 303, 304
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}


def _qwen_vision(out_hidden: int = 64) -> dict:
    return dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=out_hidden,
                fullatt_block_indexes=[0], window_size=56)


def tiny_config(model_type: str):
    if model_type == "qwen2_5_vl":
        return T.Qwen2_5_VLConfig(text_config=dict(**_TEXT, rope_parameters=_MROPE), vision_config=_qwen_vision(),
                                  image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VSTART_ID,
                                  vision_end_token_id=VEND_ID)
    if model_type == "qwen2_vl":
        return T.Qwen2VLConfig(text_config=dict(**_TEXT, rope_parameters=_MROPE),
                               vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2),
                               image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, vision_start_token_id=VSTART_ID,
                               vision_end_token_id=VEND_ID)
    if model_type == "qwen2_5_omni_thinker":
        return T.Qwen2_5OmniThinkerConfig(
            text_config=dict(**_TEXT, rope_parameters=_MROPE), vision_config=_qwen_vision(),
            audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                              output_dim=64, num_mel_bins=16, max_source_positions=50, n_window=10),
            image_token_id=IMAGE_ID, video_token_id=VIDEO_ID, audio_token_id=AUDIO_ID,
            vision_start_token_id=VSTART_ID, vision_end_token_id=VEND_ID)
    if model_type == "idefics3":
        return T.Idefics3Config(text_config=dict(model_type="llama", **_TEXT),
                                vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                   num_attention_heads=2, image_size=32, patch_size=8),
                                image_token_id=IMAGE_ID, scale_factor=2)
    if model_type == "llava":
        return T.LlavaConfig(text_config=dict(model_type="llama", **_TEXT),
                             vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
                             image_token_id=IMAGE_ID, vision_feature_layer=-1)
    raise KeyError(f"no tiny config for {model_type!r}; choices: {TINY_MODEL_TYPES}")


TINY_MODEL_TYPES = ("qwen2_5_vl", "qwen2_vl", "qwen2_5_omni_thinker", "idefics3", "llava")
_CLASSES = {
    "qwen2_5_vl": T.Qwen2_5_VLForConditionalGeneration,
    "qwen2_vl": T.Qwen2VLForConditionalGeneration,
    "qwen2_5_omni_thinker": T.Qwen2_5OmniThinkerForConditionalGeneration,
    "idefics3": T.Idefics3ForConditionalGeneration,
    "llava": T.LlavaForConditionalGeneration,
}


def tiny_model(model_type: str = "qwen2_5_vl", seed: int = 0):
    torch.manual_seed(seed)
    model = _CLASSES[model_type](tiny_config(model_type)).eval()
    return model


def tiny_qwen_vl_inputs(n_text_before: int = 5, n_text_after: int = 4, grid: tuple[int, int] = (4, 4),
                        seed: int = 0, with_mm_types: bool = True) -> dict:
    """One Qwen2(.5)-VL prompt: text, <vision_start>, image pads, <vision_end>, text."""
    g = torch.Generator().manual_seed(seed)
    h, w = grid
    n_img = h * w // 4  # spatial merge 2x2
    before = torch.randint(5, 290, (n_text_before,), generator=g)
    after = torch.randint(5, 290, (n_text_after,), generator=g)
    ids = torch.cat([before, torch.tensor([VSTART_ID]), torch.full((n_img,), IMAGE_ID), torch.tensor([VEND_ID]), after])
    batch = {
        "input_ids": ids[None],
        "attention_mask": torch.ones(1, ids.numel(), dtype=torch.long),
        "pixel_values": torch.randn(h * w, 3 * 2 * 14 * 14, generator=g),
        "image_grid_thw": torch.tensor([[1, h, w]]),
    }
    if with_mm_types:
        batch["mm_token_type_ids"] = (ids == IMAGE_ID).long()[None]
    return batch


def tiny_text_inputs(n: int = 8, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 290, (1, n), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
