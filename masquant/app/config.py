"""Typed config schemas registered in Hydra's ConfigStore.

Every group file in conf/ extends its schema (``defaults: [<group>_schema, _self_]``), so a misspelt
key or an invalid choice fails when the config is composed, naming the key and the valid values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from masquant.quant.scheme import config_schema

QuantConfig = config_schema()  # the quant group's schema: QuantScheme's fields, one definition
# a name pickle can find: a pickled config (a SLURM job's, through submitit) then refers to this very class instead of
# a copy, which OmegaConf would refuse to assign ("QuantSchemeConfig is not a subclass of QuantSchemeConfig")
QuantConfig.__module__, QuantConfig.__qualname__ = __name__, "QuantConfig"


class Modality(str, Enum):
    text = "text"
    vision = "vision"
    audio = "audio"


class VideoAs(str, Enum):
    vision = "vision"
    text = "text"  # what the official MASQuant code did


class Placement(str, Enum):
    device = "device"  # the whole model on `device`
    offload = "offload"  # decoder layers in CPU memory, one at a time on `device` (masquant.engine.placement)
    auto = "auto"  # accelerate's device map over the visible GPUs


class DType(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


@dataclass
class ModelConfig:
    name: str = MISSING
    # a registered model source (masquant.sources): testbed, testbed_omni (the tri-modal testbed), tiny (a tiny random
    # model of a real architecture: tests, debugging), local (a Hugging Face folder given by model.path)
    source: str = "testbed"
    path: Optional[str] = None  # local folder for source=local
    tiny_type: Optional[str] = None  # model_type for source=tiny
    dtype: DType = DType.float32
    placement: Placement = Placement.device  # where the weights live (masquant/engine/placement.py); not in the config hash
    max_memory_gib: Optional[float] = None  # placement=auto: memory per GPU for the device map (default: all free)


@dataclass
class ModalityConfig:
    name: str = MISSING
    modalities: list[Modality] = field(default_factory=lambda: [Modality.text, Modality.vision])
    video_as: VideoAs = VideoAs.vision


@dataclass
class CalibConfig:
    name: str = MISSING
    # a registered calibration source (masquant.sources): testbed, file (calib.path), tiny, text (the built-in corpus)
    source: str = "testbed"
    path: Optional[str] = None  # JSON/JSONL/parquet with image/audio paths + question (+ answer) for source=file
    held_out_path: Optional[str] = None  # held-out fidelity prompts from another file (default: a seeded split)
    n_samples: int = 16
    seed: int = 2
    held_out: int = 4  # extra samples (disjoint) for the fidelity SQNR
    seq_len: int = 256  # calib=text: tokens per calibration sequence
    cache: bool = True
    # True: each calibration prompt is followed by its answer, so statistics, scales and losses also see answer
    # tokens (the tokens a deployed model generates); rows must carry answers. Held-out prompts stay prompts.
    with_answers: bool = False


@dataclass
class EvalConfig:
    name: str = MISSING
    tasks: list[str] = field(default_factory=list)  # lmms-eval task names; empty = no benchmark
    limit: Optional[float] = None  # a count (>= 1) or a fraction (< 1) of each task; None = all
    data_root: Optional[str] = None  # local copies of the task data; None = the hub
    testbed_docs: int = 0  # > 0: generate this many synthetic docs per task into the run's data root
    batch_size: int = 1
    max_new_tokens: int = 128
    # a cap on every task's own max_new_tokens (LibriSpeech asks for 256); None = the tasks' values
    max_new_tokens_cap: Optional[int] = None
    # per task, a cap on its max_new_tokens fitted to its answers (a broken model otherwise generates to the limit
    # on every document); {} = the tasks' own values
    max_new_tokens_per_task: dict[str, int] = field(default_factory=dict)
    min_pixels: Optional[int] = None  # image budget of the processor; None = the processor's own
    max_pixels: Optional[int] = None
    fidelity: bool = True  # SQNR vs FP per layer and per modality on held-out samples
    ppl: bool = True  # perplexity on the held-out part of the text corpus (masquant.evaluation.text_corpus)
    ppl_sequences: int = 32  # evenly spaced held-out sequences (32 x 256 tokens: the text benchmark's setting)
    ppl_seq_len: int = 256


@dataclass
class LoggerConfig:
    name: str = MISSING
    wandb: bool = False
    wandb_mode: str = "offline"
    project: str = "masquant"


@dataclass
class PathsConfig:
    name: str = "default"
    output_root: str = "outputs"
    models_root: str = "${oc.env:MASQUANT_MODELS,/models}"  # paper experiments read <models_root>/<model.name>
    cache_dir: str = "${oc.env:MASQUANT_CACHE,${oc.env:HOME}/.cache/masquant}"


class ExportFormat(str, Enum):
    none = "none"
    compressed_tensors = "compressed_tensors"


class Unfoldable(str, Enum):
    reround = "reround"  # re-round Q(W_q diag(1/s)) on the scheme's grid (a second rounding; reported)
    refuse = "refuse"


@dataclass
class ExportConfig:
    """``export=compressed_tensors``: write the quantized model as a checkpoint beside the results (not part of the
    config hash: it changes what is written, not what is measured). See docs/export.md."""

    name: str = "none"
    format: ExportFormat = ExportFormat.none
    unfoldable_smoothing: Unfoldable = Unfoldable.reround  # a smoothing vector no producer can absorb exactly
    # the dtype of what the checkpoint keeps in floating point (embeddings, norms, vision tower, biases, LoRA); scales
    # stay float32. None: the model's (the reload then reproduces the run's logits exactly)
    dtype: Optional[DType] = None
    lora: bool = True  # MASQuant's CMC branches as PEFT LoRA adapters beside the checkpoint
    verify: bool = True  # reload the folder with transformers + compressed-tensors and compare logits
    max_rel_diff: float = 1e-6  # the reload's logits against the in-memory deployable model: max |Δ| / max |logit|


@dataclass
class SweepConfig:
    """What a run returns to a sweeper and how a sweep's table is laid out (not part of the config hash)."""

    objective: Optional[str] = None  # the metric main() returns, e.g. fidelity/sqnr/all/e2e (Optuna optimises it);
    # checked before the run (masquant.app.objective); None: main() returns None
    table: Optional[str] = None  # the sweep's table: table1 | table2 | ablation (paper layout); None: one row per run
    pivot: list[str] = field(default_factory=list)  # ablation: method-label options whose values are the rows
    reference_model: Optional[str] = None  # show this paper model's published numbers beside a model the paper lacks
    reference_ignores: list[str] = field(default_factory=list)  # label options that do not block that comparison
    testbed_of: Optional[str] = None  # a testbed experiment: the paper experiment whose cells it runs on the testbed


@dataclass
class Config:
    model: ModelConfig = MISSING
    modality: ModalityConfig = MISSING
    quant: QuantConfig = MISSING
    method: Any = MISSING
    calib: CalibConfig = MISSING
    eval: EvalConfig = MISSING
    logger: LoggerConfig = MISSING
    paths: PathsConfig = MISSING
    export: ExportConfig = field(default_factory=ExportConfig)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    tag: Optional[str] = None  # free label; part of the config hash
    force: bool = False  # re-run even if a finished result exists for this config hash
    threads: Optional[int] = None  # torch CPU threads
    reference: bool = True  # also run (or reuse) the dense FP reference of the same model/calib/eval
    recipe: str = "ours"  # ours | official: each method's preset (conf/recipes/<method>-<recipe>.yaml)
    sweep: SweepConfig = field(default_factory=SweepConfig)


_GROUPS = {
    "model": ModelConfig,
    "modality": ModalityConfig,
    "quant": QuantConfig,
    "calib": CalibConfig,
    "eval": EvalConfig,
    "logger": LoggerConfig,
    "paths": PathsConfig,
    "export": ExportConfig,
}


def hydra_dir(output_root: str) -> str:
    """Where Hydra keeps its own logs: under the output root when it can be written, else a temporary
    folder, so that an unusable ``paths.output_root`` reaches masquant's own check (a clear message)
    instead of failing inside Hydra with a traceback."""
    import os
    import tempfile
    from pathlib import Path

    root = Path(output_root).expanduser()
    try:
        root.mkdir(parents=True, exist_ok=True)
        if os.access(root, os.W_OK | os.X_OK):
            return str(root)
    except OSError:
        pass
    return str(Path(tempfile.gettempdir()) / "masquant-hydra")


def testbed_tasks(model_source: str) -> list[str]:
    """eval=testbed's tasks for a model: the five image tasks, or what its source names (testbed-omni's)."""
    from masquant.errors import ConfigError
    from masquant.evaluation.tasks import EVAL_TASKS
    from masquant.sources import model_source as source

    try:
        return list(source(model_source).testbed_tasks or EVAL_TASKS)
    except ConfigError:  # an unknown model.source: pipeline.resolve names it, with the valid ones
        return list(EVAL_TASKS)


def testbed_generation_cap(model_source: str) -> int | None:
    """eval=testbed's cap on new tokens for a model (its source's), or None."""
    from masquant.errors import ConfigError
    from masquant.sources import model_source as source

    try:
        return source(model_source).testbed_generation_cap
    except ConfigError:  # an unknown model.source: pipeline.resolve names it, with the valid ones
        return None


def testbed_answer_tokens(model_source: str) -> dict[str, int]:
    """eval=testbed's per-task caps on new tokens for a model (its source's), or {}."""
    from masquant.errors import ConfigError
    from masquant.sources import model_source as source

    try:
        return dict(source(model_source).testbed_answer_tokens)
    except ConfigError:  # an unknown model.source: pipeline.resolve names it, with the valid ones
        return {}


def gptq_option(w_quantizer, value):
    """A recipe's value of a GPTQ-only option: ``value`` when the weights are GPTQ's, else the option's default
    (``recipe=official quant.w_quantizer=rtn`` is the official RTN recipe, e.g. QuaRot's --w_rtn)."""
    return value if str(getattr(w_quantizer, "value", w_quantizer)) == "gptq" else False


def register_configs() -> None:
    from masquant.methods.registry import get_config_class, method_ids

    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("masquant_hydra_dir"):
        OmegaConf.register_new_resolver("masquant_hydra_dir", hydra_dir)
    if not OmegaConf.has_resolver("masquant_testbed_tasks"):
        OmegaConf.register_new_resolver("masquant_testbed_tasks", testbed_tasks)
    if not OmegaConf.has_resolver("masquant_testbed_answer_tokens"):
        OmegaConf.register_new_resolver("masquant_testbed_answer_tokens", testbed_answer_tokens)
    if not OmegaConf.has_resolver("masquant_testbed_generation_cap"):
        OmegaConf.register_new_resolver("masquant_testbed_generation_cap", testbed_generation_cap)
    if not OmegaConf.has_resolver("masquant_gptq_option"):  # a recipe's GPTQ option, off when the weights are RTN
        OmegaConf.register_new_resolver("masquant_gptq_option", gptq_option)
    if not OmegaConf.has_resolver("masquant_direction"):  # hydra/sweeper=optuna: direction of sweep.objective
        from masquant.app.objective import direction

        OmegaConf.register_new_resolver("masquant_direction", direction)

    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for group, node in _GROUPS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)
    # method=<id> is the method's config dataclass at its defaults (the one place they are written); a named preset
    # is a YAML file conf/method/<preset>.yaml with ``defaults: [<id>_schema, _self_]`` and the keys that differ
    for mid in method_ids():
        config = get_config_class(mid)
        cs.store(group="method", name=mid, node=config)
        cs.store(group="method", name=f"{mid}_schema", node=config)
