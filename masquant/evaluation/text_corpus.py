"""A WikiText-2 stand-in built from text every Python install ships: the help topics of ``pydoc_data``.

The field reports WikiText-2 perplexity, which cannot be downloaded here. The construction is fixed so
that numbers compare across tools: the topics of ``pydoc_data.topics`` sorted by name, split by
document (a topic is held out when ``int(sha1(name), 16) % 4 == 0``), each part joined with blank
lines, tokenized with the model's tokenizer (no special tokens), cut into consecutive 256-token
sequences; 64 evenly spaced sequences of the first part calibrate, 32 evenly spaced sequences of the
held-out part measure perplexity = exp(mean next-token NLL over all their tokens).
On the testbed's language model (SmolLM2-135M-Instruct from its Q4_1 GGUF) the dense perplexity is 15.17.
"""

from __future__ import annotations

import functools
import hashlib
import math

import torch
import torch.nn as nn
from tqdm.auto import tqdm

SEQ_LEN = 256
N_CALIB = 64
N_HELD_OUT = 32


def is_held_out(name: str) -> bool:
    return int(hashlib.sha1(name.encode()).hexdigest(), 16) % 4 == 0


@functools.lru_cache(maxsize=1)
def corpus_parts() -> tuple[str, str]:
    """(calibration text, held-out text): the pydoc topics split by document."""
    from pydoc_data.topics import topics

    names = sorted(topics)
    calib = "\n\n".join(topics[n] for n in names if not is_held_out(n))
    held = "\n\n".join(topics[n] for n in names if is_held_out(n))
    return calib, held


def token_sequences(tokenizer, text: str, seq_len: int = SEQ_LEN) -> torch.Tensor:
    """Consecutive ``seq_len``-token sequences of ``text`` [n, seq_len] (the last partial one dropped)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    n = ids.numel() // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


def evenly_spaced(seqs: torch.Tensor, k: int) -> torch.Tensor:
    """``k`` rows of ``seqs`` at evenly spaced indices (all of them when there are fewer)."""
    if k >= seqs.shape[0]:
        return seqs
    return seqs[torch.linspace(0, seqs.shape[0] - 1, k).round().long()]


def text_corpus(tokenizer, n_calib: int = N_CALIB, n_held_out: int = N_HELD_OUT, seq_len: int = SEQ_LEN
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration sequences [n_calib, seq_len], held-out sequences [n_held_out, seq_len])."""
    calib, held = corpus_parts()
    return (evenly_spaced(token_sequences(tokenizer, calib, seq_len), n_calib),
            evenly_spaced(token_sequences(tokenizer, held, seq_len), n_held_out))


@torch.no_grad()
def sequences_perplexity(model: nn.Module, seqs: torch.Tensor, device, desc: str = "perplexity") -> float:
    """exp of the mean next-token NLL over every position of every sequence [n, L] (one sequence per call)."""
    nll, count = 0.0, 0
    for ids in tqdm(seqs, desc=desc, leave=False):
        ids = ids[None].to(device)
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0].float()
        nll += float(nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / max(count, 1))
