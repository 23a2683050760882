"""The project's testbeds as sources: ``model.source=testbed`` (testbed-vl: Qwen2.5-VL carrying SmolLM2-135M's
weights and a trained vision tower), ``model.source=testbed_omni`` (testbed-omni: the Qwen2.5-Omni thinker with
Whisper tiny.en's audio encoder), ``calib.source=testbed`` (synthetic prompts of the calibration split), the
synthetic documents of the benchmark tasks (``eval.testbed_docs``), and espeak-ng, the system program that
speaks testbed-omni's clips: checked before anything loads, its version recorded with the results.

This module is the only part of the library that imports :mod:`masquant.testbed`.
"""

from __future__ import annotations

from pathlib import Path

from masquant.adapters.registry import adapter_class_for
from masquant.sources.registry import (
    CalibrationSource,
    ModelSource,
    register_calibration_source,
    register_check,
    register_model_source,
    register_provenance,
    register_task_documents,
)
from masquant.testbed.audio_tasks import AUDIO_TASKS
from masquant.testbed.tasks import TESTBED_TASKS

OMNI_TASKS = ("librispeech_test_other", "omni_bench", "mmmu_val")  # the paper's Omni rows (no Mandarin)


def _value(x) -> str:
    return str(getattr(x, "value", x))


# the synthetic answers are at most 3 tokens (a word, a colour) or a letter (SQA, MMMU, OmniBench), a LibriSpeech
# transcript at most 9: the caps leave room for a prefix or a period, and stop a broken model's rambling early
VL_ANSWER_TOKENS = {"textvqa_val": 8, "vizwiz_vqa_val": 8, "scienceqa_img": 4, "ocrbench": 8, "mmmu_val": 4}
OMNI_ANSWER_TOKENS = {"librispeech_test_other": 16, "omni_bench": 4, "mmmu_val": 4}


@register_model_source
class TestbedVL(ModelSource):
    name = "testbed"
    testbed_answer_tokens = VL_ANSWER_TOKENS

    def adapter_class(self, mcfg) -> type:
        return adapter_class_for("qwen2_5_vl")

    def modalities(self, mcfg, adapter_cls: type) -> tuple[str, ...]:
        return ("text", "vision")

    def load(self, mcfg, cache_dir, dtype):
        from masquant.testbed.model import TESTBED_VERSION, load_testbed_vl

        folder = Path(cache_dir).expanduser() / "testbed" / f"testbed-vl-{TESTBED_VERSION}"
        return load_testbed_vl(folder, dtype=dtype)


@register_model_source
class TestbedOmni(ModelSource):
    name = "testbed_omni"
    testbed_tasks = OMNI_TASKS
    testbed_answer_tokens = OMNI_ANSWER_TOKENS
    # answers are at most three words or a letter; LibriSpeech's 256 new tokens would let a broken quantized
    # model ramble for a minute per document on a CPU
    testbed_generation_cap = 24

    def adapter_class(self, mcfg) -> type:
        return adapter_class_for("qwen2_5_omni_thinker")

    def modalities(self, mcfg, adapter_cls: type) -> tuple[str, ...]:
        return ("text", "vision", "audio")

    def load(self, mcfg, cache_dir, dtype):
        from masquant.testbed.omni import load_testbed_omni

        return load_testbed_omni(cache_dir, dtype=dtype)


@register_calibration_source
class TestbedPrompts(CalibrationSource):
    name = "testbed"

    def rows(self, ccfg, adapter_cls, n: int, held_out: int):
        if "audio" in adapter_cls.token_id_attrs:  # testbed-omni: image + audio + question
            from masquant.testbed.audio_tasks import make_omni_calibration_samples

            rows = make_omni_calibration_samples(n + held_out)
            return rows[:n], rows[n:], {"source": "testbed", "split": "calib", "rows": "omni"}
        from masquant.testbed.tasks import make_calibration_samples

        rows = make_calibration_samples(n + held_out)  # distinct synthetic documents of the calib split
        return rows[:n], rows[n:], {"source": "testbed", "split": "calib"}


@register_task_documents(*TESTBED_TASKS)
def image_task_documents(task: str, n: int) -> list[dict]:
    from masquant.testbed.tasks import make_benchmark_docs

    return make_benchmark_docs(task, n)


@register_task_documents(*AUDIO_TASKS)
def audio_task_documents(task: str, n: int) -> list[dict]:
    from masquant.testbed.audio_tasks import make_audio_benchmark_docs

    return make_audio_benchmark_docs(task, n)


def speech_users(cfg) -> list[str]:
    """What in a run is spoken by espeak-ng: testbed-omni's calibration clips, the testbed's audio tasks."""
    users = [f"model={cfg.model.name}"] if _value(cfg.model.source) == TestbedOmni.name else []
    if not cfg.eval.data_root and int(cfg.eval.testbed_docs) > 0:
        spoken = [t for t in (cfg.eval.tasks or []) if t in AUDIO_TASKS]
        users += [f"eval.tasks (testbed documents of {spoken})"] if spoken else []
    return users


@register_check
def check_speech_synthesis(cfg) -> list[str]:
    """espeak-ng is a system program, not a Python package: say it is missing before the model loads rather
    than in the middle of a run."""
    from masquant.testbed.speech import ESPEAK, ESPEAK_INSTALL_HINT, espeak_available

    users = speech_users(cfg)
    if not users or espeak_available():
        return []
    return [f"{ESPEAK} is not installed, and {' and '.join(users)} need its synthetic speech: install it with "
            f"{ESPEAK_INSTALL_HINT}, or (for real audio tasks) set eval.data_root to local task data"]


@register_provenance
def speech_provenance(cfg) -> dict:
    """The system espeak-ng that spoke a run's clips (not a locked package: its version is recorded)."""
    if not speech_users(cfg):
        return {}
    from masquant.runs.provenance import UNKNOWN
    from masquant.testbed.speech import espeak_version

    return {"provenance/version/espeak-ng": espeak_version() or UNKNOWN}
