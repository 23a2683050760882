"""The benchmark tasks: one registry (:data:`TASKS`) of every lmms-eval task masquant runs, with how its data is laid
out, its headline metric and how tables show it; an optional switch to local data.

Prompts, post-processing and metrics stay lmms-eval's: a local run writes, per task, a small YAML that
``include:``s the installed task YAML by absolute path and overrides only the data source (a
``save_to_disk`` folder under ``data_root/<task>``). Nothing of lmms-eval is copied or forked.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path


class EvaluationError(RuntimeError):
    """An evaluation produced no usable result; the message names the task and the cause."""


@dataclass(frozen=True)
class TaskSource:
    yaml: str  # path of the installed task YAML, relative to lmms_eval/tasks
    split: str  # the split the task evaluates (its test_split)
    fields: tuple[str, ...]  # document fields the task code reads (besides images)
    image_columns: tuple[str, ...]  # datasets.Image() columns (None allowed)
    audio_columns: tuple[str, ...] = ()  # {"array", "sampling_rate"} structs (what a decoded datasets.Audio gives)


@dataclass(frozen=True)
class Task:
    """One benchmark: where lmms-eval finds it, its headline metric and its column in tables."""

    name: str  # lmms-eval's task name
    label: str  # its column in tables
    metrics: tuple[str, ...]  # headline metric names, tried in order (the first a result has wins)
    source: TaskSource
    percent: bool = False  # lmms-eval reports it in percent already (else a fraction, x100 in tables)
    higher_is_better: bool = True  # accuracies; error rates (WER) are lower-is-better and never averaged
    reference: str | None = None  # its column in the published tables (masquant/reporting/reference)
    # per-document scores (doc_scores): values v_i and weights w_i with Σ v / Σ w x unit = the headline metric
    scorer: str = "exact_match"

    @property
    def unit(self) -> float:
        """lmms-eval's metric = the ratio Σ v / Σ w x unit (100 for metrics it reports in percent)."""
        return 100.0 if self.percent else 1.0

    @property
    def metric_keys(self) -> tuple[str, ...]:
        """``eval/<task>/<metric>`` keys of the headline metric, in the order they are tried."""
        return tuple(f"eval/{self.name}/{m}" for m in self.metrics)

    @property
    def scale(self) -> float:
        """Our value x scale = the table's unit (percent)."""
        return 1.0 if self.percent else 100.0


# OCRBench's ``hit_rate`` (hits / documents scored) is written since lmms-eval's own ``ocrbench_accuracy``
# (hits / 1000) is kept; older results carry the hit rate under ``ocrbench_accuracy``.
TASKS: dict[str, Task] = {t.name: t for t in (
    Task("textvqa_val", "TextVQA", ("exact_match",), TaskSource(
        "textvqa/textvqa_val.yaml", "validation", ("question", "answers", "question_id"), ("image",)),
        reference="textvqa"),
    Task("vizwiz_vqa_val", "VizWiz", ("exact_match",), TaskSource(
        "vizwiz_vqa/vizwiz_vqa_val.yaml", "val", ("question", "answers", "question_id", "category"), ("image",)),
        reference="vizwiz"),
    Task("scienceqa_img", "SQA", ("exact_match",), TaskSource(
        "scienceqa/scienceqa_img.yaml", "test", ("question", "choices", "answer", "hint"), ("image",)),
        reference="scienceqa"),
    Task("ocrbench", "OCRBench", ("hit_rate", "ocrbench_accuracy"), TaskSource(
        "ocrbench/ocrbench.yaml", "test", ("question", "answer", "dataset", "question_type"), ("image",)),
        reference="ocrbench", scorer="ocrbench_hit"),
    Task("mmmu_val", "MMMU", ("mmmu_acc",), TaskSource(
        "mmmu/mmmu_val.yaml", "validation", ("id", "question", "options", "answer", "question_type"),
        tuple(f"image_{k}" for k in range(1, 8))), reference="mmmu", scorer="mmmu_judge"),
    # the Omni rows of the paper: OmniBench (image + audio + text) and speech recognition (WER / MER)
    Task("omni_bench", "OmniBench", ("accuracy",), TaskSource(
        "omni_bench/omni_bench.yaml", "train", ("question", "options", "answer", "task type"), ("image",),
        ("audio",)), percent=True, reference="omnibench", scorer="omnibench_overall"),
    Task("librispeech_test_other", "LibriSpeech WER", ("wer",), TaskSource(
        "librispeech/librispeech_test_other.yaml", "librispeech_test_other", ("gt", "source", "task"), (),
        ("audio",)), percent=True, higher_is_better=False, reference="librispeech_wer", scorer="librispeech_edits"),
    Task("wenet_speech_test_net", "WenetSpeech WER", ("mer",), TaskSource(
        "wenet_speech/wenet_speech_test_net.yaml", "test_net", ("text",), (), ("audio",)),
        percent=True, higher_is_better=False, reference="wenetspeech_wer", scorer="wenet_mer"),
)}
EVAL_TASKS: tuple[str, ...] = ("textvqa_val", "vizwiz_vqa_val", "scienceqa_img", "ocrbench", "mmmu_val")  # Table 1
AUDIO_EVAL_TASKS: tuple[str, ...] = tuple(t for t, task in TASKS.items() if task.source.audio_columns)
ALL_TASKS: tuple[str, ...] = tuple(TASKS)
TASK_SOURCES: dict[str, TaskSource] = {name: task.source for name, task in TASKS.items()}


Scores = tuple[list[float], list[float] | None]  # per-document values v_i, weights w_i (None: every w_i = 1)


def _exact_match(samples: list[dict]) -> Scores:
    return [float(s["exact_match"]) for s in samples], None


def _ocrbench_hit(samples: list[dict]) -> Scores:
    return [float(s["ocrbench_accuracy"]["score"]) for s in samples], None


def _mmmu_judge(samples: list[dict]) -> Scores:
    """lmms-eval's own MMMU judgement of each document (multiple choice and open answers)."""
    from lmms_eval.tasks.mmmu.utils import evaluate_mmmu

    return [float(evaluate_mmmu([s["mmmu_acc"]])[0].get(s["mmmu_acc"]["id"]) == "Correct") for s in samples], None


def _omnibench_overall(samples: list[dict]) -> Scores:
    return [float(s["accuracy"]["overall"]) for s in samples], None


def _librispeech_edits(samples: list[dict]) -> Scores:
    """Per document, the word edits and reference words that lmms-eval's corpus WER sums (its normalisers and
    tokenizer, as ``librispeech_wer`` -> ``compute_wer``): WER = Σ edits / Σ words."""
    import editdistance
    from lmms_eval.tasks import asr_wer_utils
    from lmms_eval.tasks.librispeech import utils

    tokenizer = asr_wer_utils.EvaluationTokenizer(tokenizer_type="none", lowercase=True, punctuation_removal=True,
                                                  character_tokenization=False)
    kw = dict(yue_languages={"yue"}, english_languages={"en"}, chinese_languages={"zh"},
              yue_converter=utils.zhconv_convert, english_normalizer=utils.english_normalizer,
              chinese_normalizer=utils.chinese_normalizer, basic_normalizer=utils.basic_normalizer)
    edits, words = [], []
    for s in samples:
        record = s["wer"]
        language = record["task"][4:]
        items = []
        for text in (record["gt"], record["pred"]):
            text = asr_wer_utils._normalize(utils.remove_sp(text, language), language, **kw)
            text_items = tokenizer.tokenize(text).split()
            items.append([c for c in "".join(text_items)] if language in {"zh", "yue"} else text_items)
        edits.append(float(editdistance.eval(items[0], items[1])))
        words.append(float(len(items[0])))
    return edits, words


def _wenet_mer(samples: list[dict]) -> Scores:
    return [float(s["mer"]) / 100.0 for s in samples], None


SCORERS = {"exact_match": _exact_match, "ocrbench_hit": _ocrbench_hit, "mmmu_judge": _mmmu_judge,
           "omnibench_overall": _omnibench_overall, "librispeech_edits": _librispeech_edits, "wenet_mer": _wenet_mer}


def doc_scores(task: str, samples: list[dict]) -> tuple[list[int], list[float], list[float] | None]:
    """(document ids, values, weights) of a task's scored documents (see :class:`Task`.scorer)."""
    values, weights = SCORERS[TASKS[task].scorer](samples)
    return [int(s["doc_id"]) for s in samples], values, weights


def headline_value(metrics: dict, task: str) -> float | None:
    """The task's headline metric in a result (as lmms-eval wrote it), or None (see :func:`metric_value`)."""
    from masquant.evaluation.metrics import metric_value

    return metric_value(metrics, TASKS[task].metric_keys)


def _source(task: str) -> TaskSource:
    if task not in TASK_SOURCES:
        raise KeyError(f"unknown evaluation task {task!r}; valid tasks: {list(TASK_SOURCES)}")
    return TASK_SOURCES[task]


def lmms_eval_tasks_dir() -> Path:
    """The installed ``lmms_eval/tasks`` folder, found without importing lmms-eval."""
    spec = importlib.util.find_spec("lmms_eval")
    if spec is None or not spec.submodule_search_locations:
        raise EvaluationError("lmms-eval is not installed (see scripts/setup.sh: it is installed with --no-deps)")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def installed_task_yaml(task: str) -> Path:
    path = lmms_eval_tasks_dir() / _source(task).yaml
    if not path.is_file():
        raise EvaluationError(f"task {task}: lmms-eval's task YAML is missing at {path}")
    return path


def local_task_dir(task: str, data_root: Path) -> Path:
    return Path(data_root).expanduser().resolve() / task


def write_local_task_data(task: str, docs: list[dict], data_root: Path) -> Path:
    """Write documents (dicts in the task's real schema, PIL images) where the local include-YAML reads them.

    Layout: ``data_root/<task>/`` is a ``DatasetDict.save_to_disk`` folder holding the task's split,
    with image columns as ``datasets.Image()`` (they decode to PIL, as from the hub). Image columns a
    document leaves out are written as None (MMMU's ``image_2`` ... ``image_7``). Audio columns are written
    as ``{"array": float32 list, "sampling_rate": int}`` structs, what a decoded ``datasets.Audio`` column gave
    before datasets 4 (decoding ``datasets.Audio`` now needs torchcodec, which this set-up lacks); the
    LibriSpeech and OmniBench task code passes them through to the model. Returns the folder.
    """
    import datasets

    source = _source(task)
    if not docs:
        raise ValueError(f"task {task}: no documents to write")
    rows = []
    for i, doc in enumerate(docs):
        missing = [f for f in source.fields if f not in doc]
        if missing:
            raise ValueError(f"task {task}: document {i} lacks fields {missing} "
                             f"(the task code reads {list(source.fields)})")
        rows.append({**doc, **{col: doc.get(col) for col in source.image_columns}})
    for row in rows:
        for col in source.audio_columns:
            audio = row[col]
            row[col] = {"array": [float(x) for x in audio["array"]], "sampling_rate": int(audio["sampling_rate"])}
    media = set(source.image_columns) | set(source.audio_columns)
    plain = datasets.Dataset.from_list([{k: v for k, v in row.items() if k not in media} for row in rows])
    audio_feature = {"array": datasets.Sequence(datasets.Value("float32")), "sampling_rate": datasets.Value("int64")}
    features = datasets.Features({**plain.features, **{col: datasets.Image() for col in source.image_columns},
                                  **{col: audio_feature for col in source.audio_columns}})
    dataset = datasets.Dataset.from_list(rows, features=features)

    out = local_task_dir(task, data_root)
    if out.exists():
        if not (out / "dataset_dict.json").is_file():
            raise EvaluationError(f"task {task}: {out} exists and is not a dataset folder; not overwriting it")
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    datasets.DatasetDict({source.split: dataset}).save_to_disk(str(out))
    return out


def check_local_task_data(task: str, data_root: Path) -> Path:
    folder = local_task_dir(task, data_root)
    split = _source(task).split
    if not (folder / "dataset_dict.json").is_file() or not (folder / split).is_dir():
        raise EvaluationError(
            f"task {task}: no local data at {folder} (expected a datasets.save_to_disk folder with split {split!r}); "
            f"write it with masquant.evaluation.write_local_task_data or save the hub dataset there")
    return folder


def write_local_task_yamls(tasks: list[str], data_root: Path, yaml_dir: Path) -> Path:
    """Write one include-YAML per task into ``yaml_dir`` (a folder per run) and return the folder.

    Each YAML keeps the task's name and everything of the installed YAML except the data source.
    """
    yaml_dir = Path(yaml_dir)
    yaml_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        folder = check_local_task_data(task, data_root)
        text = (
            "# Generated by masquant.evaluation.tasks: lmms-eval's own task, local data source only.\n"
            f"include: {_quote(installed_task_yaml(task))}\n"
            f"task: {task}\n"
            f"dataset_path: {_quote(folder)}\n"
            "dataset_name: null\n"
            "dataset_kwargs:\n"
            "  load_from_disk: true\n"
        )
        (yaml_dir / f"{task}.yaml").write_text(text)
    return yaml_dir


def _quote(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def save_hub_task_data(task: str, data_root: Path) -> Path:
    """Copy a task's split from the HF hub into the local layout (needs network; a token for gated sets)."""
    import datasets
    from lmms_eval.utils import load_yaml_config

    source = _source(task)
    config = load_yaml_config(str(installed_task_yaml(task)), mode="simple")
    split = datasets.load_dataset(config["dataset_path"], config.get("dataset_name"), split=source.split)
    out = local_task_dir(task, data_root)
    datasets.DatasetDict({source.split: split}).save_to_disk(str(out))
    return out
