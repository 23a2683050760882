"""Tables in the MASQuant paper's layout, with the published number and the delta beside each of ours.

Pure functions over result dicts (the contents of ``metrics.json``) and the reference CSVs shipped in
``masquant/reporting/reference/`` (its README gives the source of every number):

- :func:`paper_table`: rows model × bits × method (paper order), columns the paper's tasks;
- :func:`ablation_table`: rows the values of one (or more) options of the method label, e.g. ``epochs``;
- :func:`format_paper_markdown`, :func:`format_paper_latex`, :func:`format_paper_csv`: deterministic text.

Runs of the same (model, bits, method label, calibration samples, eval limit) are the seeds of one row:
the cell is their mean, with the sample standard deviation when there are two or more. A published number
is matched only when the run's model, bits and method id map to a reference row and the method label names
no option beyond the ones the paper's row fixes (a plain ``masquant`` for Table 1, ``masquant(epochs=5)``
for Table 5's ``epochs=5``). Delta = ours − paper in every column; :func:`improves_on_paper` says whether
that is better, since for WER lower is better.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass, replace
from decimal import ROUND_HALF_UP, Decimal
from importlib import resources

import pandas as pd

from masquant.methods.registry import method_order
from masquant.evaluation.metrics import metric_value
from masquant.evaluation.tasks import TASKS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Column:
    """One metric column: where our value comes from and which published column it is compared with."""

    label: str
    keys: tuple[str, ...] = ()  # metric keys of a result, the first present wins
    scale: float = 100.0  # our value × scale = the table's unit (lmms-eval's fractions -> %)
    reference: str | None = None  # column of the reference CSV; None: the paper has no such number
    higher_is_better: bool = True
    decimals: int = 1
    average_of: tuple[str, ...] = ()  # labels of the columns this one averages, per run (the Avg column)
    task: str | None = None  # the benchmark task of the column: its per-document scores give intervals and tests


@dataclass(frozen=True)
class Layout:
    """A paper table: its columns in the paper's order and the CSV of its published numbers."""

    name: str
    title: str
    reference_file: str
    columns: tuple[Column, ...]




def task_column(task: str) -> Column:
    """The column of a registered benchmark task (masquant.evaluation.tasks.TASKS)."""
    t = TASKS[task]
    return Column(t.label, t.metric_keys, scale=t.scale, reference=t.reference, higher_is_better=t.higher_is_better,
                  task=task)


MMMU, OCRBENCH, VIZWIZ, SQA, TEXTVQA = (task_column(t) for t in
                                        ("mmmu_val", "ocrbench", "vizwiz_vqa_val", "scienceqa_img", "textvqa_val"))
LIBRISPEECH_WER, WENETSPEECH_WER, OMNIBENCH = (task_column(t) for t in
                                               ("librispeech_test_other", "wenet_speech_test_net", "omni_bench"))
# our perplexity is on the project's own text, not the paper's: no reference
PPL = Column("PPL", ("fidelity/ppl",), scale=1.0, higher_is_better=False, decimals=2)
SQNR_COLUMNS = tuple(Column(f"SQNR {modality} (dB)", (f"fidelity/sqnr/{modality}/e2e",), scale=1.0, decimals=2)
                     for modality in ("text", "vision", "audio"))

TABLE1 = Layout("table1", "MASQuant Table 1 (Qwen2.5-VL)", "masquant_table1_qwen25vl.csv", (
    MMMU, OCRBENCH, VIZWIZ, SQA, TEXTVQA,
    Column("Avg", reference="avg", average_of=("MMMU", "OCRBench", "VizWiz", "SQA", "TextVQA"))))
TABLE2 = Layout("table2", "MASQuant Table 2 (Qwen2.5-Omni)", "masquant_table2_qwen25omni.csv",
                (LIBRISPEECH_WER, WENETSPEECH_WER, MMMU, OMNIBENCH))
# Tables 3-5; columns with no value in any row are dropped from an ablation table
ABLATION = Layout("ablation", "MASQuant Tables 3-5 (ablations, W4A8)", "masquant_ablations.csv", (
    TEXTVQA, MMMU, SQA, Column("Avg", reference="avg", average_of=("TextVQA", "MMMU", "SQA")),
    LIBRISPEECH_WER, OMNIBENCH, PPL, *SQNR_COLUMNS))
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (TABLE1, TABLE2, ABLATION)}

# run/model (conf/model/*.yaml ``name``) -> model column of the reference CSVs
REFERENCE_MODELS: dict[str, str] = {
    "Qwen2.5-VL-3B-Instruct": "Qwen2.5-VL-3B",
    "Qwen2.5-VL-7B-Instruct": "Qwen2.5-VL-7B",
    "Qwen2.5-Omni-3B": "Qwen2.5-Omni-3B",
    "Qwen2.5-Omni-7B": "Qwen2.5-Omni-7B",
}
# run/bits (QuantScheme.tag) -> bits column of the reference CSVs; the paper's W4A16 is group 128 (spec §1)
REFERENCE_BITS: dict[str, str] = {"FP16": "fp16", "W4A16-g128": "w4a16", "W8A8": "w8a8", "W4A8": "w4a8", "W4A6": "w4a6"}
# Table 3 mixes models: its WER and OmniBench columns are Omni-3B, its TextVQA and MMMU columns VL-3B
MIXED_MODEL_COLUMNS: dict[str, str] = {"librispeech_wer": "Qwen2.5-Omni-3B", "omnibench": "Qwen2.5-Omni-3B",
                                       "textvqa": "Qwen2.5-VL-3B", "mmmu": "Qwen2.5-VL-3B"}
# (table, setting) of masquant_ablations.csv -> the MASQuant options that setting fixes
ABLATION_SETTINGS: dict[tuple[str, str], dict[str, str]] = {
    ("3", "uniform"): {"uniform": "True", "learn": "False", "deploy": "per_modality_weights"},
    ("3", "mas"): {"uniform": "False", "learn": "False", "deploy": "per_modality_weights"},
    ("3", "uniform+opt"): {"uniform": "True", "learn": "True", "deploy": "per_modality_weights"},
    ("3", "mas+opt"): {"uniform": "False", "learn": "True", "deploy": "per_modality_weights"},
    ("4", "lambda_t=1.0 lambda_v=1.0"): {"lambda_text": "1.0", "lambda_vision": "1.0"},
    ("4", "lambda_t=1.0 lambda_v=0.5"): {"lambda_text": "1.0", "lambda_vision": "0.5"},
    ("4", "lambda_t=1.0 lambda_v=0.1"): {"lambda_text": "1.0", "lambda_vision": "0.1"},
    ("4", "lambda_t=0.5 lambda_v=1.0"): {"lambda_text": "0.5", "lambda_vision": "1.0"},
    ("5", "epochs=1"): {"epochs": "1"},
    ("5", "epochs=2"): {"epochs": "2"},
    ("5", "epochs=5"): {"epochs": "5"},
    ("5", "epochs=10"): {"epochs": "10"},
}
ABLATION_METHOD = "masquant"
PAPER_SETTING = ("", "")  # the setting of Tables 1-2: the method at its defaults

BITS_ORDER = ("FP16", "W4A16-g128", "W8A8", "W4A8", "W4A6")
# the method rows of the papers whose tables this project reproduces (MASQuant Tables 1-2, the rotation
# baselines): a sweep may drop the jobs of such a method when a checkout does not register it
# (hydra.sweeper.drop_unregistered). Facts about the papers, not a list of our methods: the table order of
# registered methods is their registration's (masquant.methods.registry.method_order).
PAPER_METHODS = ("dense", "rtn", "smoothquant", "awq", "mbq", "quarot", "mquant", "masquant")
MISSING = "-"
COMPARED_WITH = "rtn"  # the method label of the row a paper table's paired tests compare every row with

# (setting, model, method, bits, reference column) -> published number
ReferenceKey = tuple[tuple[str, str], str, str, str, str]


@dataclass(frozen=True)
class PaperTable:
    """A table ready to format: ``frame`` holds the ``keys`` columns, then per metric column ``c``
    the columns ``c.label`` (ours, mean over the row's runs), ``"<label> std"`` and, where ``c.reference``,
    ``"<label> paper"`` and ``"<label> delta"`` (NaN where there is nothing)."""

    keys: tuple[str, ...]
    columns: tuple[Column, ...]
    frame: pd.DataFrame
    source: str  # where the published numbers come from, for the legend
    varied: tuple[str, ...] = ()  # the sources of randomness that differ between the runs of a row (varied_sources)
    compared_with: str = COMPARED_WITH  # the method label of each row's reference row (paired tests), same bits
    grids: str = ""  # which integer grid the rows of each bit width use (grids_text), for the legend


# ---------------------------------------------------------------------------------------------- labels

def _split_top_level(text: str, sep: str = ",") -> list[str]:
    """``text`` split at ``sep`` outside brackets and quotes: ``"a=1,b=[1, 2]"`` -> ``["a=1", "b=[1, 2]"]``."""
    parts, depth, quote, start = [], 0, "", 0
    for i, char in enumerate(text):
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == sep and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_method_label(label: str) -> tuple[str, dict[str, str]]:
    """The method id and options of a label:
    ``"masquant(learn=False,cmc.rank_ratio=0.05)"`` -> ``("masquant", {"learn": "False", "cmc.rank_ratio": "0.05"})``.

    Keys may contain dots, values dots, brackets and commas inside brackets (``cmc.roles=['q', 'k']``).
    """
    label = label.strip()
    method_id, paren, body = label.partition("(")
    if not paren:
        return method_id, {}
    if not body.endswith(")") or not method_id:
        raise ValueError(f"method label {label!r}: expected 'id' or 'id(key=value,...)'")
    options = {}
    for part in _split_top_level(body[:-1]):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"method label {label!r}: option {part!r} is not key=value")
        options[key.strip()] = value.strip()
    return method_id.strip(), options


def format_method_label(method_id: str, options: Mapping[str, str]) -> str:
    """The inverse of :func:`parse_method_label`."""
    return f"{method_id}({','.join(f'{k}={v}' for k, v in options.items())})" if options else method_id


def option_values(config) -> dict[str, str]:
    """Every option of a method config dataclass as the method label writes it (``cmc.rank_ratio`` -> ``"0.2"``)."""
    values = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name == "id":
            continue
        if is_dataclass(value):
            values.update({f"{f.name}.{g.name}": str(getattr(value, g.name)) for g in fields(value)})
        else:
            values[f.name] = str(getattr(value, "value", value))
    return values


def _as_number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def same_option_value(a: str, b: str) -> bool:
    """Option values as written in labels: numerically when both are numbers (``"1"`` == ``"1.0"``), else as text."""
    x, y = _as_number(a), _as_number(b)
    if x is not None and y is not None:
        return x == y
    return a.strip().lower() == b.strip().lower()


def setting_matches(label_options: Mapping[str, str], defaults: Mapping[str, str], setting: Mapping[str, str]) -> bool:
    """Whether a run is the paper's ``setting``: its label sets no other option and every option of the setting
    has the setting's value (from the label, else from the method's ``defaults``)."""
    if not set(label_options) <= set(setting):
        return False
    effective = {**defaults, **label_options}
    return all(k in effective and same_option_value(effective[k], v) for k, v in setting.items())


# ---------------------------------------------------------------------------------------------- runs

def method_label_of(result: Mapping) -> str:
    return str(result.get("run/method_label", result.get("run/method")))


def seed_of(result: Mapping) -> int:
    """``run/seed``; results written before it existed ran with seed 0."""
    return int(result.get("run/seed") or 0)


# Method options that only draw randomness (QuaRot's and MQuant's rotation signs): runs that differ in them are the
# seeds of one row, not two rows (the sweeper's ``seeds`` option sets them with ``seed``).
SEED_OPTIONS = ("seed",)


def row_label(result: Mapping) -> str:
    """The method label of a result's table row: its label without the seed options."""
    method_id, options = parse_method_label(method_label_of(result))
    return format_method_label(method_id, {k: v for k, v in options.items() if k not in SEED_OPTIONS})


def variance_sources(result: Mapping) -> dict[str, object]:
    """What a result's randomness came from: ``seed`` (torch's generator: learned parts, data order), each seed
    option of its method (``method.seed``: random rotation signs) and ``calib.seed`` (which samples calibrate)."""
    options = parse_method_label(method_label_of(result))[1]
    calib = result.get("run/calib_set")
    return {"seed": seed_of(result),
            **{f"method.{k}": options.get(k, "default") for k in SEED_OPTIONS},
            "calib.seed": calib.get("seed") if isinstance(calib, Mapping) else None}


def varied_sources(groups: Mapping[object, Sequence[Mapping]]) -> tuple[str, ...]:
    """The sources of randomness that differ between the runs of at least one row (what its ± covers)."""
    varied: set[str] = set()
    for runs in groups.values():
        sources = [variance_sources(r) for r in runs]
        varied |= {k for k in sources[0] if len({repr(s[k]) for s in sources}) > 1}
    return tuple(sorted(varied))


RowKey = tuple[str, str, str, object, object]  # model, bits, method label, calibration samples, eval limit


def row_key(result: Mapping) -> RowKey:
    return (str(result.get("run/model")), str(result.get("run/bits")), row_label(result),
            result.get("run/calib_samples"), result.get("run/eval_limit"))


def group_seeds(results: Iterable[Mapping]) -> dict[RowKey, list[Mapping]]:
    """Runs grouped by :func:`row_key`: the runs of one group are the seeds of one table row."""
    groups: dict[RowKey, list[Mapping]] = {}
    for result in results:
        groups.setdefault(row_key(result), []).append(result)
    for key, runs in groups.items():
        seeds = [seed_of(r) for r in runs]
        if len(set(seeds)) < len(seeds):
            log.warning("row %s has several runs with the same seed (%s): they differ in something the table does "
                        "not show (output root, modalities, calibration seed?) and are averaged", key, sorted(seeds))
    return groups


def run_value(result: Mapping, column: Column, columns: Sequence[Column]) -> float | None:
    """One run's value in the table's unit; an average column needs every column it averages."""
    if column.average_of:
        by_label = {c.label: c for c in columns}
        parts = [run_value(result, by_label[label], columns) for label in column.average_of]
        return None if any(p is None for p in parts) else statistics.fmean(parts)
    value = metric_value(result, column.keys)
    return None if value is None else float(value) * column.scale


def mean_and_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean, and the sample standard deviation (n - 1) when there are two or more finite values."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    if len(values) < 2 or not all(math.isfinite(v) for v in values):
        return mean, None
    return mean, statistics.stdev(values)


# ---------------------------------------------------------------------------------------------- references

def load_reference(file: str) -> pd.DataFrame:
    """One of the reference CSVs shipped in ``masquant/reporting/reference/``."""
    with resources.files("masquant.reporting").joinpath("reference", file).open(encoding="utf-8") as f:
        return pd.read_csv(f, dtype={"table": str})


def _model_of_column(model: str, column: str) -> str:
    """The reference row's model for ``column``: Table 3's ``A|B`` rows take it from :data:`MIXED_MODEL_COLUMNS`."""
    if "|" not in model:
        return model
    chosen = MIXED_MODEL_COLUMNS[column]
    if chosen not in model.split("|"):
        raise ValueError(f"reference model {model!r}: column {column} is mapped to {chosen}, not one of them")
    return chosen


def reference_values(reference: pd.DataFrame) -> dict[ReferenceKey, float]:
    """Published numbers keyed by (setting, model, method, bits, column); a setting is ``(table, setting)``, or
    :data:`PAPER_SETTING` for CSVs without a ``setting`` column. Empty cells are left out."""
    index = ("table", "setting", "model", "method", "bits")
    values: dict[ReferenceKey, float] = {}
    for row in reference.to_dict("records"):
        setting = (str(row["table"]), str(row["setting"])) if "setting" in row else PAPER_SETTING
        method = str(row.get("method", ABLATION_METHOD))
        for column, value in row.items():
            if column in index or pd.isna(value):
                continue
            model = _model_of_column(str(row["model"]), column)
            values[(setting, model, method, str(row["bits"]), column)] = float(value)
    return values


def settings_for_pivot(pivot: Sequence[str]) -> dict[tuple[str, str], dict[str, str]]:
    """The ablation settings of the paper tables that vary every pivot option (``epochs`` -> Table 5)."""
    tables = {table for table, _ in ABLATION_SETTINGS}
    varying = {t for t in tables if all(set(pivot) <= set(fixed) for (table, _), fixed in ABLATION_SETTINGS.items()
                                        if table == t)}
    return {key: fixed for key, fixed in ABLATION_SETTINGS.items() if key[0] in varying}


@dataclass(frozen=True)
class StandIn:
    """Published numbers shown beside runs of a model the paper lacks (the testbed): ``models`` maps a run's model
    to the paper model whose numbers are shown; ``ignore_options`` are label options that do not keep a run from
    its paper row (the testbed's MASQuant learning rate). The legend says both: compare orderings, not values."""

    models: Mapping[str, str] = field(default_factory=dict)
    ignore_options: tuple[str, ...] = ()

    def note(self) -> str:
        if not self.models:
            return ""
        pairs = ", ".join(f"{ours} beside {paper}" for ours, paper in self.models.items())
        ignored = f"; label options not compared: {', '.join(self.ignore_options)}" if self.ignore_options else ""
        return f"; stand-in: {pairs} (another model: compare orderings, not values{ignored})"


def published_value(references: Mapping[ReferenceKey, float], settings: Mapping[tuple[str, str], Mapping[str, str]],
                    key: RowKey, defaults: Mapping[str, str], column: str, stand_in: StandIn = StandIn()
                    ) -> float | None:
    """The paper's number for a row's cell, or None (unmapped model or bits, no matching setting, empty cell)."""
    model, bits, label = key[0], key[1], key[2]
    paper_model = REFERENCE_MODELS.get(model) or stand_in.models.get(model)
    paper_model = REFERENCE_MODELS.get(paper_model, paper_model)  # a stand-in named as run/model or as in the CSVs
    if paper_model not in REFERENCE_MODELS.values() or bits not in REFERENCE_BITS:
        return None
    method_id, options = parse_method_label(label)
    options = {k: v for k, v in options.items() if k not in stand_in.ignore_options}
    for setting, fixed in settings.items():
        if setting_matches(options, defaults, fixed):
            value = references.get((setting, paper_model, method_id, REFERENCE_BITS[bits], column))
            if value is not None:
                return value
    return None


def improves_on_paper(column: Column, delta: float) -> bool:
    """Whether ours − paper = ``delta`` is better than the paper in ``column`` (lower is better for WER)."""
    return delta > 0 if column.higher_is_better else delta < 0


def better_direction(column: Column) -> str:
    return "higher" if column.higher_is_better else "lower"


# ---------------------------------------------------------------------------------------------- tables

def _rank(value: str, order: Sequence[str]) -> tuple[int, str]:
    return (order.index(value), "") if value in order else (len(order), value)


def _model_rank(model: str) -> tuple[int, str]:
    return _rank(model, list(REFERENCE_MODELS))


def _sortable(value) -> tuple[int, float, str]:
    """A sort key for mixed values: numbers and booleans (False < True) first, by value, then the rest as text."""
    text = str(value)
    number = float(text == "True") if text in ("True", "False") else _as_number(text)
    return (0, number, "") if number is not None and not math.isnan(number) else (1, 0.0, text)


SIGNIFICANCE = 0.05  # a cell differs from its reference row when the paired test's p is below this


def run_interval(result: Mapping, column: Column) -> tuple[float, float] | None:
    """The 95 % interval over documents of one run's value in the table's unit (None when not recorded)."""
    ci = result.get(f"eval/{column.task}/ci95") if column.task else None
    if not isinstance(ci, (list, tuple)) or len(ci) != 2:
        return None
    return float(ci[0]) * column.scale, float(ci[1]) * column.scale


def _documents(result: Mapping, task: str) -> dict[int, tuple[float, float]]:
    """{doc id: (value, weight)} of one run's scored documents of ``task`` (empty when not recorded)."""
    ids, values = result.get(f"eval/{task}/doc_ids"), result.get(f"eval/{task}/doc_values")
    if not isinstance(ids, list) or not isinstance(values, list) or len(ids) != len(values):
        return {}
    weights = result.get(f"eval/{task}/doc_weights") or [1.0] * len(values)
    return {int(i): (float(v), float(w)) for i, v, w in zip(ids, values, weights)}


def paired_p(runs: Sequence[Mapping], reference: Sequence[Mapping], task: str) -> float | None:
    """The paired test's p-value of a row against its reference row on ``task``: runs matched by seed, each on the
    documents both scored (pooled over the matched seeds); None without per-document scores."""
    from masquant.evaluation.intervals import paired_p_value

    by_seed = {seed_of(r): r for r in reference}
    a_v, a_w, b_v, b_w = [], [], [], []
    for run in runs:
        if seed_of(run) not in by_seed:
            continue
        mine, theirs = _documents(run, task), _documents(by_seed[seed_of(run)], task)
        for doc in sorted(set(mine) & set(theirs)):
            a_v.append(mine[doc][0]), a_w.append(mine[doc][1])
            b_v.append(theirs[doc][0]), b_w.append(theirs[doc][1])
    if not a_v:
        return None
    ratio = any(w != 1.0 for w in a_w + b_w)
    return paired_p_value(a_v, b_v, a_w if ratio else None, b_w if ratio else None)[0]


def _cells(runs: Sequence[Mapping], columns: Sequence[Column], published: Mapping[str, float | None],
           reference: Sequence[Mapping] | None = None) -> dict[str, float | None]:
    """Ours (mean, std over the row's runs), its interval over documents (one run) and the p-value of the paired
    test against the ``reference`` row's runs; and, where the column has a reference, the published number and the
    delta."""
    row: dict[str, float | None] = {}
    half: dict[str, float | None] = {}
    for column in columns:
        values = [v for v in (run_value(r, column, columns) for r in runs) if v is not None]
        mean, std = mean_and_std(values)
        row[column.label], row[f"{column.label} std"] = mean, std
        lo = hi = p = None
        if len(runs) == 1 and mean is not None:
            if column.average_of:  # independent tasks: the half-widths add in quadrature, divided by their number
                parts = [half.get(label) for label in column.average_of]
                if all(h is not None for h in parts):
                    h = math.sqrt(sum(x * x for x in parts)) / len(parts)
                    lo, hi = mean - h, mean + h
            elif (ci := run_interval(runs[0], column)) is not None:
                lo, hi = ci
        half[column.label] = None if lo is None else (hi - lo) / 2
        if reference and column.task:
            p = paired_p(runs, reference, column.task)
        row[f"{column.label} ci_low"], row[f"{column.label} ci_high"], row[f"{column.label} p"] = lo, hi, p
        if column.reference is not None:
            paper = published.get(column.reference)
            row[f"{column.label} paper"] = paper
            row[f"{column.label} delta"] = None if mean is None or paper is None else mean - paper
    return row


def frame_names(column: Column) -> list[str]:
    """The frame's columns for one metric column: ours, std, the interval, the paired test's p, and paper, delta
    where it has a reference."""
    names = [column.label, f"{column.label} std", f"{column.label} ci_low", f"{column.label} ci_high",
             f"{column.label} p"]
    return names + ([f"{column.label} paper", f"{column.label} delta"] if column.reference is not None else [])


def grids_text(results: Iterable[Mapping]) -> str:
    """'W4A16: W asym g128 / A16; W4A8: ...' from the results' ``run/grid``, per bit width; where rows of one bit width
    use different grids, each grid names its methods. Empty when no result says its grid."""
    by_bits: dict[str, dict[str, set[str]]] = {}
    for r in results:
        if r.get("run/grid") and r.get("run/bits") != "FP16":
            by_bits.setdefault(str(r["run/bits"]), {}).setdefault(r["run/grid"], set()).add(method_label_of(r))
    parts = []
    for bits in sorted(by_bits, key=lambda b: _rank(b, BITS_ORDER)):
        grids = by_bits[bits]
        if len(grids) == 1:
            parts.append(f"{bits}: {next(iter(grids))}")
        else:
            parts.append(f"{bits}: " + ", ".join(f"{g} ({', '.join(sorted(m))})" for g, m in sorted(grids.items())))
    return "; ".join(parts)


def _frame(rows: list[dict], keys: Sequence[str], columns: Sequence[Column]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[*keys, *(name for c in columns for name in frame_names(c))])


def paper_table(results: Iterable[Mapping], layout: Layout = TABLE1,
                references: Mapping[ReferenceKey, float] | None = None, stand_in: StandIn = StandIn(),
                compared_with: str = COMPARED_WITH) -> PaperTable:
    """Rows model × bits × method in the paper's order (FP16 first, then W4A16, W8A8, W4A8, W4A6, then other
    bits; methods in their registered order, then unregistered ones), one per
    (model, bits, method label, calib samples, eval limit), columns the layout's; ``references`` defaults to
    the layout's CSV. Only a method at its defaults (label == id) is compared with the paper."""
    if references is None:
        references = reference_values(load_reference(layout.reference_file))
    results = list(results)
    groups = group_seeds(results)

    def order(key: RowKey):
        method_id = parse_method_label(key[2])[0]
        return (_model_rank(key[0]), _rank(key[1], BITS_ORDER), method_order(method_id), key[2],
                _sortable(key[3]), _sortable(key[4]))

    keys = ("model", "bits", "method", "calib", "limit", "n")
    rows = []
    for key in sorted(groups, key=order):
        published = {c.reference: published_value(references, {PAPER_SETTING: {}}, key, {}, c.reference, stand_in)
                     for c in layout.columns if c.reference is not None}
        rtn = (key[0], key[1], compared_with, key[3], key[4])  # the paired tests' reference: RTN at the same bits
        reference = groups.get(rtn) if key != rtn else None
        rows.append({"model": key[0], "bits": key[1], "method": key[2], "calib": key[3], "limit": key[4],
                     "n": len(groups[key]), **_cells(groups[key], layout.columns, published, reference)})
    return PaperTable(keys, layout.columns, _frame(rows, keys, layout.columns),
                      f"{layout.title}, reference/{layout.reference_file}{stand_in.note()}", varied_sources(groups),
                      compared_with, grids_text(results))


def _non_empty(frame: pd.DataFrame, column: Column) -> Column | None:
    """``column`` without its paper and delta sub-columns where no row has a published number; None where no
    row has any number."""
    has_paper = column.reference is not None and bool(frame[f"{column.label} paper"].notna().any())
    if not has_paper and not frame[column.label].notna().any():
        return None
    return column if has_paper else replace(column, reference=None)


def ablated_methods(results: Sequence[Mapping], pivot: Sequence[str]) -> set[str]:
    """The ids of the methods whose labels set a pivot option in some run; ValueError when there is none."""
    if not pivot:
        raise ValueError("an ablation table needs at least one option to pivot on")
    labelled = [parse_method_label(method_label_of(r)) for r in results]
    methods = {method_id for method_id, options in labelled if set(pivot) & set(options)}
    if not methods:
        seen = sorted({k for _, options in labelled for k in options})
        raise ValueError(f"no run's method label sets {list(pivot)}; options set by some label: {seen}")
    return methods


def ablation_table(results: Iterable[Mapping], pivot: Sequence[str], defaults: Mapping[str, Mapping[str, str]],
                   method: str | None = None, references: Mapping[ReferenceKey, float] | None = None,
                   stand_in: StandIn = StandIn()) -> PaperTable:
    """Rows the values of the ``pivot`` options of the method label, within blocks of (model, bits, the rest of
    the label); columns the ablation layout's that hold a value in some row (paper and delta only where some row
    has a published number).

    Only the runs of ``method``, or else of the methods whose labels set a pivot option in some run, are kept.
    ``defaults``: method id -> option -> the value a label leaves out (see :func:`option_values`); a value taken
    from it is shown as ``<v> (default)``. The published numbers are those of the paper's ablation table that
    varies the pivot options (``epochs`` -> Table 5), for runs whose label sets no option outside that table's.
    """
    pivot = list(pivot)
    results = list(results)
    methods = {method} if method else ablated_methods(results, pivot)
    kept = [r for r in results if parse_method_label(method_label_of(r))[0] in methods]
    if references is None:
        references = reference_values(load_reference(ABLATION.reference_file))
    settings = settings_for_pivot(pivot)
    groups = group_seeds(kept)

    def described(key: RowKey) -> dict[str, object]:
        method_id, options = parse_method_label(key[2])
        method_defaults = defaults.get(method_id, {})
        context = {k: v for k, v in options.items() if k not in pivot}
        shown = {k: options[k] if k in options else (f"{method_defaults[k]} (default)" if k in method_defaults
                                                      else "default") for k in pivot}
        return {"model": key[0], "bits": key[1], "method": format_method_label(method_id, context), **shown}

    def order(key: RowKey):
        d = described(key)
        pivot_order = tuple(_sortable(str(d[k]).removesuffix(" (default)")) for k in pivot)
        return (_model_rank(key[0]), _rank(key[1], BITS_ORDER), d["method"], pivot_order,
                _sortable(key[3]), _sortable(key[4]))

    keys = ("model", "bits", "method", *pivot, "calib", "limit", "n")
    rows = []
    previous: dict[tuple, RowKey] = {}  # block -> its last row: the paired tests compare each step with the one before
    for key in sorted(groups, key=order):
        method_defaults = defaults.get(parse_method_label(key[2])[0], {})
        published = {c.reference: published_value(references, settings, key, method_defaults, c.reference,
                                                  stand_in)
                     for c in ABLATION.columns if c.reference is not None}
        block = (key[0], key[1], described(key)["method"], key[3], key[4])
        reference = groups[previous[block]] if block in previous else None
        previous[block] = key
        rows.append({**described(key), "calib": key[3], "limit": key[4], "n": len(groups[key]),
                     **_cells(groups[key], ABLATION.columns, published, reference)})
    frame = _frame(rows, keys, ABLATION.columns)
    columns = tuple(c for c in (_non_empty(frame, c) for c in ABLATION.columns) if c is not None)
    frame = frame[[*keys, *(name for c in columns for name in frame_names(c))]]
    tables = sorted({table for table, _ in settings})
    source = (f"MASQuant Table{'s' if len(tables) > 1 else ''} {', '.join(tables)}, reference/{ABLATION.reference_file}"
              if tables else f"none: the paper has no ablation over {', '.join(pivot)}")
    return PaperTable(keys, columns, frame, source + (stand_in.note() if tables else ""), varied_sources(groups),
                      grids=grids_text(results))


# ---------------------------------------------------------------------------------------------- formats

def _is_missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _fixed(value: float, decimals: int) -> str:
    """``value`` with ``decimals`` decimals, halves rounded away from zero as in the paper (9.125 -> 9.13, where
    ``format`` gives 9.12), never ``-0.0``; ``inf`` as ``inf``."""
    value = float(value)
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = str(Decimal(repr(value)).quantize(Decimal(1).scaleb(-decimals), rounding=ROUND_HALF_UP))
    return text[1:] if text.startswith("-") and float(text) == 0 else text


def _signed(value: float, decimals: int) -> str:
    """A delta with its sign: ``+1.2``, ``-0.3``, ``0.0``."""
    text = _fixed(value, decimals)
    return text if float(text) == 0 or text.startswith("-") or math.isinf(value) else f"+{text}"


def _key_text(name: str, value) -> str:
    if _is_missing(value):
        return "all" if name == "limit" else MISSING
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _ours_text(row: Mapping, column: Column, pm: str, star: str) -> str:
    """Ours: the mean, ± the seeds' std (several runs) or the half-width of the interval over documents (one run),
    and ``star`` when the paired test against the row's reference gives p < 5 %."""
    label, decimals = column.label, column.decimals
    mean, std = row[label], row[f"{label} std"]
    if _is_missing(mean):
        return MISSING
    text = _fixed(mean, decimals)
    lo, hi = row.get(f"{label} ci_low"), row.get(f"{label} ci_high")
    if not _is_missing(std):
        text += f"{pm}{_fixed(std, decimals)}"
    elif not (_is_missing(lo) or _is_missing(hi)):
        text += f"{pm}{_fixed((hi - lo) / 2, decimals)}"
    p = row.get(f"{label} p")
    return text + (star if not _is_missing(p) and p < SIGNIFICANCE else "")


def _row_cells(row: Mapping, column: Column, pm: str, number: str = "{}", star: str = "*") -> list[str]:
    """Ours, and paper and delta where the column has a reference, as text (``number`` wraps numbers, e.g. math)."""
    ours = _ours_text(row, column, pm, star)
    cells = [ours if ours == MISSING else number.format(ours)]
    if column.reference is not None:
        paper, delta = row[f"{column.label} paper"], row[f"{column.label} delta"]
        cells.append(MISSING if _is_missing(paper) else _fixed(paper, column.decimals))
        cells.append(MISSING if _is_missing(delta) else number.format(_signed(delta, column.decimals)))
    return cells


def _legend(table: PaperTable, pm: str = "±", delta: str = "Δ", minus: str = "−", arrows: str = "↑/↓") -> str:
    over = (f" (they differ in {', '.join(table.varied)}: that is the variance it covers, not the documents')"
            if table.varied else "")
    return (f"ours: the mean over the n runs (seeds) of a row, {pm} their sample std when n > 1{over}, else {pm} the "
            f"half-width of the 95 % interval over the scored documents (Wilson for right/wrong scores, bootstrap "
            f"otherwise; Avg: the tasks' half-widths added in quadrature); *: differs from the row's reference (the "
            f"{table.compared_with} row of the same bits; in ablations the row before) at 5 % by a paired test on the same documents "
            f"(exact McNemar for right/wrong scores, permutation otherwise); paper: {table.source}; "
            f"{delta} = ours {minus} paper; {arrows}: higher/lower is better."
            + (f" Integer grids: {table.grids}." if table.grids else ""))


def _arrow(column: Column, up: str, down: str) -> str:
    return up if column.higher_is_better else down


def format_paper_markdown(table: PaperTable) -> str:
    """A Markdown table, then a one-line legend."""
    header = list(table.keys)
    for column in table.columns:
        header.append(f"{column.label} {_arrow(column, '↑', '↓')}")
        header += ["paper", "Δ"] if column.reference is not None else []
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in table.frame.to_dict("records"):
        cells = [_key_text(k, row[k]).replace("|", "\\|") for k in table.keys]
        for column in table.columns:
            cells += _row_cells(row, column, " ± ")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", _legend(table)])


_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                  "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(char, char) for char in text)


UP, DOWN = r"$\uparrow$", r"$\downarrow$"


def format_paper_latex(table: PaperTable) -> str:
    """A booktabs tabular: a header row of metric names over ours / paper / Δ, ``$a \\pm s$`` cells, then the
    legend as a comment."""
    widths = [3 if c.reference is not None else 1 for c in table.columns]
    spec = "".join("r" if k == "n" else "l" for k in table.keys) + "".join("r" * w for w in widths)
    top, rules, sub = [""] * len(table.keys), [], [latex_escape(k) for k in table.keys]
    start = len(table.keys) + 1
    for column, width in zip(table.columns, widths):
        name = f"{latex_escape(column.label)} {_arrow(column, UP, DOWN)}"
        top.append(rf"\multicolumn{{{width}}}{{c}}{{{name}}}")
        rules.append(rf"\cmidrule(lr){{{start}-{start + width - 1}}}")
        sub += ["ours", "paper", r"$\Delta$"] if width == 3 else ["ours"]
        start += width
    lines = [rf"\begin{{tabular}}{{{spec}}}", r"\toprule", " & ".join(top) + r" \\", " ".join(rules),
             " & ".join(sub) + r" \\", r"\midrule"]
    for row in table.frame.to_dict("records"):
        cells = [latex_escape(_key_text(k, row[k])) for k in table.keys]
        for column in table.columns:
            cells += _row_cells(row, column, r" \pm ", number="${}$", star="^{*}")
        lines.append(" & ".join(cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", "% " + _legend(table, "+-", "Delta", "-", "up/down arrow")]
    return "\n".join(lines)


def format_paper_csv(table: PaperTable) -> str:
    """The frame as CSV: the keys, then per metric column ours, std, the interval's ends, the paired test's p and
    paper, delta with the column's decimals (p with three significant digits; empty where there is nothing);
    ``delta`` is ours − paper whatever the direction of the column."""
    decimals = {name: c.decimals for c in table.columns for name in frame_names(c)}

    def text(name: str, value) -> str:
        if name in decimals and name.endswith(" p"):  # a p-value: three significant digits
            return "" if _is_missing(value) else f"{float(value):.3g}"
        if name in decimals:
            return "" if _is_missing(value) else _fixed(value, decimals[name])
        return _key_text(name, value)

    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(table.frame.columns)
    for row in table.frame.to_dict("records"):
        writer.writerow([text(name, value) for name, value in row.items()])
    return out.getvalue()
