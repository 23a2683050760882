"""Parts every adapter's tiny model uses: a byte-level BPE tokenizer trained in-process, random images and audio.

Tiny models are random models of the real architectures, with a processor of the real class, so tests and
``model=tiny_*`` runs go through exactly the code paths of a real checkpoint, without downloading anything.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)
_CORPUS = ["Answer the question using a single word or phrase.", "what is shown in the picture? red blue green",
           "A. B. C. D. yes no stop the image shows a dog and a cat", "0 1 2 3 4 5 6 7 8 9 how many dots"]
TINY_WORDS = ("red", "blue", "green", "dog", "cat", "stop", "yes", "no", "two", "three", "shape", "color")


def tiny_tokenizer(specials: list[str], named: dict[str, str] | None = None, *, eos: str, pad: str,
                   bos: str | None = None, vocab_size: int = 300):
    """A byte-level BPE tokenizer (any text round-trips) whose first ids are ``specials``, in milliseconds.

    ``named`` maps model-specific attribute names (``image_token``, ``boi_token``, ...) to special tokens,
    as the real tokenizer configs do, so the real processor classes find them.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    kwargs = {"extra_special_tokens": dict(named)} if named else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=pad, bos_token=bos, **kwargs)


def token_ids(tokenizer, **tokens: str) -> dict[str, int]:
    """{config attribute: id} for special tokens, e.g. token_ids(tok, image_token_id='<image>')."""
    return {attr: tokenizer.convert_tokens_to_ids(token) for attr, token in tokens.items()}


def random_image(seed: int, size: tuple[int, int] = (112, 84)) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=g, dtype=torch.uint8)
    return Image.fromarray(pixels.numpy())


def random_audio(seed: int, seconds: float = 1.0, rate: int = 16000) -> np.ndarray:
    return (np.random.RandomState(seed).randn(int(seconds * rate)) * 0.1).astype("float32")


def tiny_rows(n: int, seed: int, modalities: tuple[str, ...] = ("vision",)) -> list[dict]:
    """``n`` calibration rows (question, answer, image and/or audio) of random content, deterministic in ``seed``."""
    rng = np.random.RandomState(seed)
    rows = []
    for i in range(n):
        words = [TINY_WORDS[j] for j in rng.randint(0, len(TINY_WORDS), size=4)]
        row = {"question": f"what is {words[0]} {words[1]}?", "answer": f"{words[2]} {words[3]}"}
        if "vision" in modalities:
            row["image"] = random_image(seed * 1000 + i)
        if "audio" in modalities:
            row["audio"] = random_audio(seed * 1000 + i)
        rows.append(row)
    return rows
