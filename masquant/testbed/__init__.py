"""The testbed MLLM `testbed-vl` (SmolLM2-135M inside a small Qwen2.5-VL) and its synthetic tasks."""

from masquant.testbed.tasks import TESTBED_TASKS, make_benchmark_docs, make_calibration_samples, make_training_samples

__all__ = ["TESTBED_TASKS", "load_testbed_vl", "make_benchmark_docs", "make_calibration_samples", "make_training_samples"]


def __getattr__(name: str):
    if name == "load_testbed_vl":  # imported lazily: it pulls in transformers
        from masquant.testbed.model import load_testbed_vl

        return load_testbed_vl
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
