"""Adapters for the supported model families: paths and token-id attributes only."""

from __future__ import annotations

from masquant.adapters.base import ModelAdapter
from masquant.adapters.registry import register_adapter


@register_adapter
class Qwen2VLAdapter(ModelAdapter):
    """Qwen2-VL and Qwen2.5-VL: ``model.language_model`` decoder, ``model.visual`` tower + merger."""

    model_types = ("qwen2_vl", "qwen2_5_vl")
    encoder_paths = {"vision": "model.visual"}
    token_id_attrs = {"vision": ("image_token_id",), "video": ("video_token_id",)}


@register_adapter
class Qwen25OmniThinkerAdapter(ModelAdapter):
    """Qwen2.5-Omni thinker: text decoder with vision and audio towers.

    A full Qwen2.5-Omni folder (model_type qwen2_5_omni) loads as its thinker only: the talker and
    token2wav are not part of the paper's setting (thinker-only quantization).
    """

    model_types = ("qwen2_5_omni_thinker", "qwen2_5_omni")
    encoder_paths = {"vision": "model.visual", "audio": "model.audio_tower"}
    token_id_attrs = {
        "vision": ("image_token_id", "image_token_index"),
        "video": ("video_token_id", "video_token_index"),
        "audio": ("audio_token_id", "audio_token_index"),
    }

    @staticmethod
    def load_pretrained(path, dtype):
        from transformers import Qwen2_5OmniThinkerForConditionalGeneration

        return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=dtype)


@register_adapter
class Idefics3Adapter(ModelAdapter):
    """Idefics3 / SmolVLM: a Llama decoder under ``model.text_model``."""

    model_types = ("idefics3", "smolvlm")
    language_model_path = "model.text_model"
    encoder_paths = {"vision": "model.vision_model", "projector": "model.connector"}
    token_id_attrs = {"vision": ("image_token_id",)}


@register_adapter
class LlavaAdapter(ModelAdapter):
    """LLaVA (Llama/Mistral/Qwen2 decoder under ``model.language_model``)."""

    model_types = ("llava",)
    encoder_paths = {"vision": "model.vision_tower", "projector": "model.multi_modal_projector"}
    token_id_attrs = {"vision": ("image_token_id", "image_token_index")}
