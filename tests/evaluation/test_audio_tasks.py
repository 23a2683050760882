"""The audio tasks through lmms-eval's own task code: WER on known strings, local data with audio columns, and
an oracle behind the real wrapper and the real Qwen2.5-Omni processor (audio placeholders expanded per clip)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from masquant.adapters.families import Qwen25OmniThinkerAdapter
from masquant.adapters.tiny import random_image
from masquant.evaluation import evaluate_lmms, format_eval_table, write_local_task_data
from support.evaluation import AnswerBookModel


def _wer(pairs):
    from lmms_eval.tasks.librispeech.utils import librispeech_wer

    return librispeech_wer([{"task": "asr_en", "gt": gt, "pred": pred} for gt, pred in pairs], None)


def test_wer_on_known_strings():
    assert _wer([("SEVEN FIVE", "seven five")]) == 0.0
    assert _wer([("SEVEN FIVE", "Seven, five.")]) == 0.0  # punctuation and case are normalised away
    # one substitution in six words, one insertion in two: 2 errors / 8 reference words
    assert _wer([("THE CAT SAT ON THE MAT", "the cat sat on a mat"), ("RED CIRCLE", "red circle blue")]) == 25.0
    assert _wer([("RED CIRCLE", "")]) == 100.0


def test_wenet_mer_on_known_strings():
    from lmms_eval.tasks.wenet_speech.utils import wenet_speech_process_results

    assert wenet_speech_process_results({"text": "今天 天气 很好"}, ["今天 天气 不好"])["mer"] == pytest.approx(100 / 6)


def _clip(seconds: float, seed: int) -> dict:
    return {"array": (np.random.RandomState(seed).randn(int(16000 * seconds)) * 0.1).astype("float32"),
            "sampling_rate": 16000}


class AudioAnswerBook(AnswerBookModel):
    """Answers by the number of audio placeholder tokens in the prompt (LibriSpeech prompts are all alike)."""

    def __init__(self, tokenizer, audio_token_id: int, answers: dict[int, str]):
        super().__init__(tokenizer, {})
        self.audio_token_id, self.by_length = audio_token_id, answers

    def generate(self, input_ids, attention_mask=None, **kwargs):
        self.answers = {}
        marked = []
        for ids in input_ids:
            n = int((ids == self.audio_token_id).sum())
            self.answers[n] = self.by_length[n]
            marked.append(torch.cat([ids, self.tokenizer(f"[q{n}]", return_tensors="pt").input_ids[0]]))
        out = super().generate(torch.stack(marked), torch.ones(len(marked), marked[0].shape[0], dtype=torch.long),
                               **kwargs)
        return torch.cat([input_ids, out[:, marked[0].shape[0]:]], dim=1)


@pytest.fixture(scope="module")
def omni_processor():
    return Qwen25OmniThinkerAdapter.tiny_processor()


def test_librispeech_oracle_through_lmms_eval(omni_processor, tmp_path):
    from transformers.models.qwen2_5_omni.processing_qwen2_5_omni import _get_feat_extract_output_lengths

    refs = ["RED CIRCLE", "GREEN TRIANGLE", "BLUE STAR", "YELLOW SQUARE"]  # no number words: the normaliser joins them
    docs = [{"audio": _clip(0.5 * (i + 1), i), "gt": refs[i], "source": "test", "task": "asr_en"} for i in range(4)]
    write_local_task_data("librispeech_test_other", docs, tmp_path / "data")
    n_tokens = [int(_get_feat_extract_output_lengths(torch.tensor(8000 * (i + 1) // 160))) for i in range(4)]
    assert len(set(n_tokens)) == 4
    answers = {n: (refs[i].lower() if i % 2 == 0 else "black dog") for i, n in enumerate(n_tokens)}
    tok = omni_processor.tokenizer
    model = AudioAnswerBook(tok, tok.convert_tokens_to_ids("<|AUDIO|>"), answers)
    metrics = evaluate_lmms(model, omni_processor, ["librispeech_test_other"], limit=None, data_root=tmp_path / "data",
                            output_dir=tmp_path / "out", batch_size=2)
    assert metrics["eval/librispeech_test_other/wer"] == pytest.approx(50.0)  # 4 of 8 words wrong
    assert metrics["eval/librispeech_test_other/n_docs"] == 4
    assert all("input_features" in c and "feature_attention_mask" in c for c in model.calls)
    assert "librispeech_test_other | wer | 50.0000 | 4" in format_eval_table(metrics)


def test_omnibench_oracle_sees_audio_then_image(omni_processor, tmp_path):
    docs = []
    for i in range(4):
        options = ["red", "circle", "blue", "star"]
        docs.append({"audio": _clip(1.0, i), "image": random_image(i), "question": f"[q{i}] Which option?",
                     "options": options, "answer": options[i], "task type": "color" if i < 2 else "shape"})
    write_local_task_data("omni_bench", docs, tmp_path / "data")
    oracle = {i: "ABCD"[i] if i % 2 == 0 else "ABCD"[(i + 1) % 4] for i in range(4)}
    model = AnswerBookModel(omni_processor.tokenizer, oracle)
    metrics = evaluate_lmms(model, omni_processor, ["omni_bench"], limit=None, data_root=tmp_path / "data",
                            output_dir=tmp_path / "out", batch_size=2)
    assert metrics["eval/omni_bench/accuracy"] == pytest.approx(50.0)
    call = model.calls[0]
    assert {"input_features", "pixel_values", "image_grid_thw"} <= call.keys()
    prompt = omni_processor.tokenizer.decode(call["input_ids"][0])
    assert prompt.index("<|audio_bos|>") < prompt.index("<|vision_start|>")  # lmms-eval's order: [audio, image]
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples_omni_bench.jsonl").read_text().splitlines()]
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2, 3]
