"""Adapters for the supported model families: paths, token ids, norm kind, between-layer steps, tiny models.

Adding a model touches only this file (an adapter class) and one config file (``conf/model/<name>.yaml``).
"""

from __future__ import annotations

import torch

from masquant.adapters.base import ModelAdapter, VisionEncoderSpec
from masquant.adapters.norms import NormKind
from masquant.adapters.registry import register_adapter
from masquant.adapters.tiny import TINY_TEXT, tiny_tokenizer, token_ids

_MROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
_QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>"]
_QWEN_NAMED = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_bos_token": "<|vision_start|>",
               "vision_eos_token": "<|vision_end|>", "audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>",
               "audio_eos_token": "<|audio_eos|>"}
# Qwen's chat template reduced to what calibration and evaluation use (images, audio, text, answers).
_QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'audio' %}<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _qwen_tokenizer():
    return tiny_tokenizer(_QWEN_SPECIALS, _QWEN_NAMED, eos="<|im_end|>", pad="<|endoftext|>")


def _qwen_vision_ids(tok) -> dict[str, int]:
    return token_ids(tok, image_token_id="<|image_pad|>", video_token_id="<|video_pad|>",
                     vision_start_token_id="<|vision_start|>", vision_end_token_id="<|vision_end|>")


def _qwen_text(tok, **extra) -> dict:
    return {**TINY_TEXT, "vocab_size": len(tok), "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id,
            "bos_token_id": tok.pad_token_id, "rope_parameters": dict(_MROPE), **extra}


def _qwen_image_processor(patch_size: int = 14):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=(2 * patch_size) ** 2, max_pixels=(8 * patch_size) ** 2,
                                    patch_size=patch_size)


def _tolerant(name: str):
    import transformers

    from masquant.adapters.processors import tolerant_processor_class

    return tolerant_processor_class(getattr(transformers, name))


# Qwen2.5-VL's vision tower (and Qwen2.5-Omni's): RMSNorm blocks, gated MLP, the merger's RMSNorm then a linear
# over 2x2 merged patches (in_features = 4 · width).
_QWEN25_VISION_BLOCKS = VisionEncoderSpec(
    path="model.visual", blocks="blocks", norm_kind=NormKind.rms,
    linears=(("qkv", "attn.qkv"), ("o", "attn.proj"), ("gate", "mlp.gate_proj"), ("up", "mlp.up_proj"),
             ("down", "mlp.down_proj")),
    norm_feeds=(("norm1", ("qkv",)), ("norm2", ("gate", "up"))), writers=("o", "down"), mlp_output=("down",),
    entry=("model.visual.patch_embed.proj",), exit_norm="model.visual.merger.ln_q",
    exit_linear="model.visual.merger.mlp.0", values=("qkv", 2, 3))

_QWEN25_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                      fullatt_block_indexes=[0], window_size=56)


@register_adapter
class Qwen25VLAdapter(ModelAdapter):
    """Qwen2.5-VL: ``model.language_model`` decoder, ``model.visual`` tower + merger."""

    model_types = ("qwen2_5_vl",)
    model_class = "Qwen2_5_VLForConditionalGeneration"
    processor_class = "Qwen2_5_VLProcessor"
    encoder_paths = {"vision": "model.visual"}
    encoder_output_paths = ("model.visual.merger.mlp.2",)
    vision_encoder = _QWEN25_VISION_BLOCKS
    token_id_attrs = {"vision": ("image_token_id",), "video": ("video_token_id",)}

    @classmethod
    def tiny_processor(cls):
        return _tolerant(cls.processor_class)(image_processor=_qwen_image_processor(), tokenizer=_qwen_tokenizer(),
                                              video_processor=None, chat_template=_QWEN_TEMPLATE)

    @classmethod
    def tiny_config(cls, tok):
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(text_config=_qwen_text(tok), vision_config=dict(_QWEN25_VISION), **_qwen_vision_ids(tok))


@register_adapter
class Qwen2VLAdapter(Qwen25VLAdapter):
    """Qwen2-VL: the Qwen2.5-VL layout with the older vision tower."""

    model_types = ("qwen2_vl",)
    model_class = "Qwen2VLForConditionalGeneration"
    processor_class = "Qwen2VLProcessor"
    # LayerNorm blocks with a plain MLP (fc1 -> QuickGELU -> fc2); the merger's norm is a LayerNorm too
    vision_encoder = VisionEncoderSpec(
        path="model.visual", blocks="blocks", norm_kind=NormKind.layer,
        linears=(("qkv", "attn.qkv"), ("o", "attn.proj"), ("up", "mlp.fc1"), ("down", "mlp.fc2")),
        norm_feeds=(("norm1", ("qkv",)), ("norm2", ("up",))), writers=("o", "down"), mlp_output=("down",),
        entry=("model.visual.patch_embed.proj",), exit_norm="model.visual.merger.ln_q",
        exit_linear="model.visual.merger.mlp.0", values=("qkv", 2, 3))

    @classmethod
    def tiny_config(cls, tok):
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig(text_config=_qwen_text(tok),
                             vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2),
                             **_qwen_vision_ids(tok))


@register_adapter
class Qwen3VLAdapter(Qwen25VLAdapter):
    """Qwen3-VL: Qwen3 decoder (q/k norms, interleaved M-RoPE) and DeepStack: visual features of several
    vision layers are added to the hidden states of the visual tokens after the first decoder layers."""

    model_types = ("qwen3_vl",)
    model_class = "Qwen3VLForConditionalGeneration"
    processor_class = "Qwen3VLProcessor"
    encoder_output_paths = ("model.visual.merger.linear_fc2",)
    # not declared: a learned position embedding (interpolated) is added to the stream after the patch embedding,
    # and DeepStack's mergers read intermediate blocks' outputs through their own norms
    vision_encoder = None

    def encoder_output_linears(self):
        # DeepStack's mergers write into the residual stream too (added after the first decoder layers)
        deepstack = getattr(self.model.get_submodule("model.visual"), "deepstack_merger_list", [])
        return super().encoder_output_linears() + [m.linear_fc2 for m in deepstack]

    def between_layers_state(self, language_model_kwargs: dict) -> dict | None:
        embeds = language_model_kwargs.get("deepstack_visual_embeds")
        if embeds is None:
            return None
        return {"visual_pos_masks": language_model_kwargs["visual_pos_masks"], "deepstack_visual_embeds": list(embeds)}

    def after_layer(self, layer_idx: int, hidden: torch.Tensor, state: dict | None) -> torch.Tensor:
        if state is None or layer_idx >= len(state["deepstack_visual_embeds"]):
            return hidden
        # the model's own step (Qwen3VLTextModel._deepstack_process), not a copy of it
        return self.language_model()._deepstack_process(hidden, state["visual_pos_masks"],
                                                        state["deepstack_visual_embeds"][layer_idx])

    @classmethod
    def tiny_processor(cls):
        return _tolerant(cls.processor_class)(image_processor=_qwen_image_processor(16), tokenizer=_qwen_tokenizer(),
                                              video_processor=None, chat_template=_QWEN_TEMPLATE)

    @classmethod
    def tiny_config(cls, tok):
        from transformers import Qwen3VLConfig

        text = _qwen_text(tok, head_dim=16, num_hidden_layers=3)
        text["rope_parameters"]["mrope_interleaved"] = True
        vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      deepstack_visual_indexes=[0, 1], num_position_embeddings=64)
        return Qwen3VLConfig(text_config=text, vision_config=vision, **_qwen_vision_ids(tok))


@register_adapter
class Qwen25OmniThinkerAdapter(ModelAdapter):
    """Qwen2.5-Omni thinker: text decoder with vision and audio towers.

    A full Qwen2.5-Omni folder (model_type qwen2_5_omni) loads as its thinker only: the talker and
    token2wav are not part of the paper's setting (thinker-only quantization).
    """

    model_types = ("qwen2_5_omni_thinker", "qwen2_5_omni")
    model_class = "Qwen2_5OmniThinkerForConditionalGeneration"
    processor_class = "Qwen2_5OmniProcessor"
    encoder_paths = {"vision": "model.visual", "audio": "model.audio_tower"}
    encoder_output_paths = ("model.visual.merger.mlp.2", "model.audio_tower.proj")
    vision_encoder = VisionEncoderSpec(
        path="model.visual", blocks="blocks", norm_kind=NormKind.rms,
        linears=(("q", "attn.q"), ("k", "attn.k"), ("v", "attn.v"), ("o", "attn.proj"), ("gate", "mlp.gate_proj"),
                 ("up", "mlp.up_proj"), ("down", "mlp.down_proj")),
        norm_feeds=(("norm1", ("q", "k", "v")), ("norm2", ("gate", "up"))), writers=("o", "down"),
        mlp_output=("down",), entry=("model.visual.patch_embed.proj",), exit_norm="model.visual.merger.ln_q",
        exit_linear="model.visual.merger.mlp.0", values=("v", 0, 1))
    token_id_attrs = {
        "vision": ("image_token_id", "image_token_index"),
        "video": ("video_token_id", "video_token_index"),
        "audio": ("audio_token_id", "audio_token_index"),
    }

    @classmethod
    def tiny_processor(cls):
        from transformers import WhisperFeatureExtractor

        return _tolerant(cls.processor_class)(image_processor=_qwen_image_processor(), video_processor=None,
                                              feature_extractor=WhisperFeatureExtractor(feature_size=16),
                                              tokenizer=_qwen_tokenizer(), chat_template=_QWEN_TEMPLATE)

    @classmethod
    def tiny_config(cls, tok):
        from transformers import Qwen2_5OmniThinkerConfig

        audio = dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64, output_dim=64,
                     num_mel_bins=16, max_source_positions=1500, n_window=100)
        return Qwen2_5OmniThinkerConfig(text_config=_qwen_text(tok), vision_config=dict(_QWEN25_VISION),
                                        audio_config=audio, audio_token_id=tok.convert_tokens_to_ids("<|AUDIO|>"),
                                        **_qwen_vision_ids(tok))

    @classmethod
    def tiny_modalities(cls):
        return ("vision", "audio")


@register_adapter
class Gemma3Adapter(ModelAdapter):
    """Gemma 3: ``x · (1 + w)`` RMSNorms, a norm before and after each block (pre_feedforward_layernorm
    feeds gate/up), sliding and full attention layers with their own masks and rotary embeddings, and
    bidirectional attention inside images (``token_type_ids``)."""

    model_types = ("gemma3",)
    model_class = "Gemma3ForConditionalGeneration"
    processor_class = "Gemma3Processor"
    encoder_paths = {"vision": "model.vision_tower", "projector": "model.multi_modal_projector"}
    norm_kind = NormKind.rms_one_plus
    mlp_norm_path = "pre_feedforward_layernorm"
    supports_residual_rotation = False
    residual_rotation_blocker = (
        "Gemma 3 normalises each block's output (post_attention_layernorm, post_feedforward_layernorm) before "
        "adding it to the residual stream; a norm between the block and the residual does not commute with a "
        "rotation of the stream, so o_proj/down_proj cannot absorb Q exactly")
    token_id_attrs = {"vision": ("image_token_id", "image_token_index")}
    _SPECIALS = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                 "<image_soft_token>"]
    _TEMPLATE = (
        "{{ bos_token }}{% for message in messages %}<start_of_turn>"
        "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}<start_of_image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )

    @classmethod
    def tiny_processor(cls):
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        tok = tiny_tokenizer(cls._SPECIALS, {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                             "image_token": "<image_soft_token>"}, eos="<eos>", pad="<pad>", bos="<bos>")
        return Gemma3Processor(image_processor=Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
                               tokenizer=tok, chat_template=cls._TEMPLATE, image_seq_length=16)

    @classmethod
    def tiny_config(cls, tok):
        from transformers import Gemma3Config

        text = dict(**{**TINY_TEXT, "num_hidden_layers": 4}, head_dim=16, vocab_size=len(tok), sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"] * 2, pad_token_id=tok.pad_token_id,
                    eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                      patch_size=8)
        ids = token_ids(tok, boi_token_id="<start_of_image>", eoi_token_id="<end_of_image>",
                        image_token_id="<image_soft_token>")
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16, **ids)


@register_adapter
class Idefics3Adapter(ModelAdapter):
    """Idefics3 / SmolVLM: a Llama decoder under ``model.text_model``."""

    model_types = ("idefics3", "smolvlm")
    model_class = "Idefics3ForConditionalGeneration"
    processor_class = "Idefics3Processor"
    language_model_path = "model.text_model"
    encoder_paths = {"vision": "model.vision_model", "projector": "model.connector"}
    encoder_output_paths = ("model.connector.modality_projection.proj",)
    # SigLIP: LayerNorm blocks, a learned position embedding added to the patch embedding, the post-LayerNorm
    # read by the connector's projection over pixel-shuffled tokens (each token's channels stay contiguous)
    vision_encoder = VisionEncoderSpec(
        path="model.vision_model", blocks="encoder.layers", norm_kind=NormKind.layer,
        linears=(("q", "self_attn.q_proj"), ("k", "self_attn.k_proj"), ("v", "self_attn.v_proj"),
                 ("o", "self_attn.out_proj"), ("up", "mlp.fc1"), ("down", "mlp.fc2")),
        norm_feeds=(("layer_norm1", ("q", "k", "v")), ("layer_norm2", ("up",))), writers=("o", "down"),
        mlp_output=("down",),
        entry=("model.vision_model.embeddings.patch_embedding", "model.vision_model.embeddings.position_embedding"),
        exit_norm="model.vision_model.post_layernorm", exit_linear="model.connector.modality_projection.proj",
        values=("v", 0, 1), num_heads_attr="num_attention_heads")
    token_id_attrs = {"vision": ("image_token_id",)}
    _SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                 "<global-img>"]
    _TEMPLATE = (
        "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
        "{% if message['content'] is string %} {{ message['content'] }}{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %} {{ c['text'] }}{% endif %}{% endfor %}"
        "{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
    )

    @classmethod
    def tiny_processor(cls):
        from transformers import Idefics3Processor
        from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

        tok = tiny_tokenizer(cls._SPECIALS, {"image_token": "<image>", "fake_image_token": "<fake_token_around_image>",
                                             "global_image_token": "<global-img>",
                                             "end_of_utterance_token": "<end_of_utterance>"},
                             eos="<end_of_utterance>", pad="<|endoftext|>", bos="<|im_start|>")
        images = Idefics3ImageProcessorPil(size={"longest_edge": 64}, max_image_size={"longest_edge": 64},
                                           do_image_splitting=False)
        return Idefics3Processor(image_processor=images, tokenizer=tok, chat_template=cls._TEMPLATE, image_seq_len=16)

    @classmethod
    def tiny_config(cls, tok):
        from transformers import Idefics3Config

        return Idefics3Config(
            text_config=dict(model_type="llama", **TINY_TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                               image_size=64, patch_size=8),
            image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)


@register_adapter
class LlavaAdapter(ModelAdapter):
    """LLaVA (Llama/Mistral/Qwen2 decoder under ``model.language_model``)."""

    model_types = ("llava",)
    model_class = "LlavaForConditionalGeneration"
    processor_class = "LlavaProcessor"
    encoder_paths = {"vision": "model.vision_tower", "projector": "model.multi_modal_projector"}
    encoder_output_paths = ("model.multi_modal_projector.linear_2",)
    token_id_attrs = {"vision": ("image_token_id", "image_token_index")}
    _TEMPLATE = (
        "{{ bos_token }}{% for message in messages %}{{ message['role'].upper() }}: "
        "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}<image>\n{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
        "{% endif %}\n{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )

    @classmethod
    def tiny_processor(cls):
        from transformers import LlavaProcessor
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

        tok = tiny_tokenizer(["<pad>", "<s>", "</s>", "<image>"], {"image_token": "<image>"}, eos="</s>", pad="<pad>",
                             bos="<s>")
        images = LlavaImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
        return LlavaProcessor(image_processor=images, tokenizer=tok, chat_template=cls._TEMPLATE, patch_size=8,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)

    @classmethod
    def tiny_config(cls, tok):
        from transformers import LlavaConfig

        return LlavaConfig(
            text_config=dict(model_type="llama", **TINY_TEXT, vocab_size=len(tok), pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id),
            vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               num_attention_heads=2, image_size=32, patch_size=8),
            image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
            vision_feature_select_strategy="default")
