"""The WikiText-2 stand-in: its construction rule, and perplexity as exp(mean next-token NLL)."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from masquant.evaluation import text_corpus as tc
from support.tiny import tiny


def test_split_by_document_follows_the_sha1_rule():
    from pydoc_data.topics import topics

    calib, held = tc.corpus_parts()
    names = sorted(topics)
    held_names = [n for n in names if int(hashlib.sha1(n.encode()).hexdigest(), 16) % 4 == 0]
    assert 0 < len(held_names) < len(names)
    assert held == "\n\n".join(topics[n] for n in held_names)
    assert topics[held_names[0]] not in calib


def test_sequences_are_consecutive_and_evenly_spaced():
    _, processor, _ = tiny("qwen2_5_vl")
    tok = processor.tokenizer
    calib_text, _ = tc.corpus_parts()
    seqs = tc.token_sequences(tok, calib_text, 16)
    ids = tok(calib_text, add_special_tokens=False).input_ids
    assert seqs.shape[1] == 16 and seqs.shape[0] == len(ids) // 16
    assert seqs[3].tolist() == ids[48:64]
    picked = tc.evenly_spaced(seqs, 5)
    n = seqs.shape[0]
    assert [int(torch.nonzero((seqs == row).all(1))[0]) for row in picked] == [round(i * (n - 1) / 4) for i in range(5)]
    calib, held = tc.text_corpus(tok, 8, 4, 32)
    assert calib.shape == (8, 32) and held.shape == (4, 32)


def test_perplexity_is_exp_of_the_mean_next_token_nll():
    model, processor, _ = tiny("qwen2_5_vl")
    seqs = tc.text_corpus(processor.tokenizer, 1, 3, 24)[1]
    nll, count = 0.0, 0
    with torch.no_grad():
        for s in seqs:
            logp = torch.log_softmax(model(input_ids=s[None]).logits[0].float(), -1)
            nll -= float(logp[torch.arange(23), s[1:]].sum())
            count += 23
    assert tc.sequences_perplexity(model, seqs, "cpu") == pytest.approx(math.exp(nll / count), rel=1e-5)


@pytest.mark.slow
def test_testbed_dense_perplexity_matches_the_toolkits_figure():
    """15.17 was measured with llm-compressor on the same construction: the corpus and the metric agree."""
    from masquant.testbed.model import load_testbed_vl

    model, processor = load_testbed_vl()
    held = tc.text_corpus(processor.tokenizer)[1]
    assert tc.sequences_perplexity(model, held, "cpu") == pytest.approx(15.17, abs=0.01)
