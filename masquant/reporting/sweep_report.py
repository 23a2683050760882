"""The table and plots of one sweep, written into its folder when its jobs end (and by experiments/reproduce.py).

``sweep.table`` chooses the layout: ``table1`` / ``table2`` (the paper's, with its numbers and the deltas),
``ablation`` (rows the values of ``sweep.pivot``), or none (one row per run). ``sweep.reference_model`` shows a
paper model's numbers beside a model the paper lacks (the testbed), ignoring ``sweep.reference_ignores`` label
options. Files: ``table.{md,tex,csv}`` (the layout), ``runs.{md,csv}`` (one row per run: SQNR, perplexity),
``plots/*.png`` and ``sweep.json`` (the jobs, their result folders, the dropped and the failed ones).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from omegaconf import OmegaConf

from masquant.reporting.paper import (LAYOUTS, SQNR_COLUMNS, Column, Layout, PaperTable, StandIn,
                                      ablation_table, paper_table)
from masquant.reporting.plots import layer_sqnr_frames, plot_layer_sqnr, plot_table_bars
from masquant.runs.store import is_finished, load_result, write_json_atomic

log = logging.getLogger(__name__)
RECORD = "sweep.json"
# SQNR of every token, per modality, and perplexity: what every run has, whatever its benchmarks
FIDELITY = Layout("fidelity", "SQNR vs FP and perplexity", "", (
    Column("SQNR all (dB)", ("fidelity/sqnr/all/e2e",), scale=1.0, decimals=2), *SQNR_COLUMNS,
    Column("PPL", ("fidelity/ppl",), scale=1.0, higher_is_better=False, decimals=2)))


def write_sweep_record(sweep_dir: Path, plan, failed: Sequence) -> Path:
    record = {"jobs": [list(j) for j in plan.jobs], "run_dirs": [str(d) for d in plan.run_dirs],
              "dropped": [{"job": list(j), "why": why} for j, why in plan.dropped],
              "failed": [{"job": list(j or []), "error": e} for j, e in failed]}
    write_json_atomic(record, Path(sweep_dir) / RECORD)
    return Path(sweep_dir) / RECORD


def read_sweep_record(sweep_dir: Path) -> dict:
    return json.loads((Path(sweep_dir) / RECORD).read_text())


def finished_results(run_dirs: Sequence) -> list[dict]:
    """The results of the folders that hold a finished run, in order, each once."""
    seen, results = set(), []
    for d in map(Path, run_dirs):
        if d not in seen and is_finished(d):
            seen.add(d)
            results.append(load_result(d))
    return results


def stand_in(sweep_cfg) -> StandIn:
    ref = OmegaConf.select(sweep_cfg, "reference_model")
    return StandIn({}, ()) if not ref else StandIn(
        {"*": str(ref)}, tuple(OmegaConf.select(sweep_cfg, "reference_ignores") or ()))


def _with_models(comparison: StandIn, results: Sequence[dict]) -> StandIn:
    """The stand-in "*" (every model of the sweep the paper lacks) made explicit."""
    if "*" not in comparison.models:
        return comparison
    models = {str(r.get("run/model")): comparison.models["*"] for r in results}
    return replace(comparison, models=models)


def layout_table(sweep_cfg, results: Sequence[dict]) -> PaperTable | None:
    """The sweep's table in its ``sweep.table`` layout, or None for the one-row-per-run table."""
    from masquant.reporting.cli import method_defaults

    name = OmegaConf.select(sweep_cfg, "table")
    comparison = _with_models(stand_in(sweep_cfg), results)
    if not name:
        return None
    if name == "ablation":
        pivot = list(OmegaConf.select(sweep_cfg, "pivot") or [])
        methods = {str(r.get("run/method")) for r in results if r.get("run/method") != "dense"}
        return ablation_table([r for r in results if r.get("run/method") != "dense"], pivot,
                              method_defaults(methods), stand_in=comparison)
    if name not in LAYOUTS:
        raise ValueError(f"sweep.table={name!r}: valid layouts are {sorted(LAYOUTS)} (or null: one row per run)")
    return paper_table(results, LAYOUTS[name], stand_in=comparison)


def _bar_rows(table: PaperTable) -> PaperTable:
    """An ablation table's rows as bars: the "method" of each bar names its pivot values."""
    pivot = [k for k in table.keys if k not in ("model", "bits", "method", "calib", "limit", "n")]
    if not pivot:
        return table
    frame = table.frame.copy()
    frame["method"] = [" ".join([str(r["method"])] + [f"{k}={r[k]}" for k in pivot]) for _, r in frame.iterrows()]
    return replace(table, frame=frame)


def write_plots(results: Sequence[dict], table: PaperTable | None, plots_dir: Path, title: str) -> list[Path]:
    """Bars of the layout's average (or first) column and of the SQNR per modality; per-layer SQNR per modality."""
    written = []
    if table is not None:
        labels = [c.label for c in table.columns]
        for label in (["Avg"] if "Avg" in labels else labels[:1]):
            written.append(plot_table_bars(_bar_rows(table), label, plots_dir / f"bars_{_slug(label)}.png",
                                           f"{title}: {label}"))
    fidelity = _bar_rows(paper_table(results, FIDELITY, references={}))
    for column in FIDELITY.columns:
        written.append(plot_table_bars(fidelity, column.label, plots_dir / f"bars_{_slug(column.label)}.png",
                                       f"{title}: {column.label}"))
    for modality, frame in layer_sqnr_frames(results).items():
        written.append(plot_layer_sqnr(frame, plots_dir / f"layer_sqnr_{modality}.png",
                                       f"{title}: SQNR vs FP per layer, {modality} tokens"))
    return [p for p in written if p is not None]


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower()).strip("_").replace("__", "_")


def dropped_notes(dropped: Sequence, jobs: Sequence[Sequence[str]] = ()) -> str:
    """One line per dropped job, naming only the overrides that are not common to every job of the sweep."""
    every = [list(j) for j, _ in dropped] + [list(j) for j in jobs]
    common = set.intersection(*(set(j) for j in every)) if every else set()
    return "".join(f"\nnot run: {' '.join(o for o in job if o not in common)}: {why}" for job, why in dropped)


def sweep_report(config, run_dirs: Sequence, sweep_dir: Path, dropped: Sequence = (), run_jobs: Sequence = ()) -> str:
    """Write the sweep's tables and plots into ``sweep_dir``; returns the Markdown that was written."""
    from masquant.reporting.cli import format_paper, format_run_table, write_text_atomic

    sweep_dir = Path(sweep_dir)
    results = finished_results(run_dirs)
    if not results:
        return "no finished results in this sweep"
    sweep_cfg = OmegaConf.select(config, "sweep") or {}
    choices = OmegaConf.select(config, "hydra.runtime.choices") or {}
    title = str(choices.get("experiment") or OmegaConf.select(sweep_cfg, "table") or "sweep")
    table = layout_table(sweep_cfg, results)
    runs_md = format_run_table(results, "md")
    write_text_atomic(sweep_dir / "runs.md", runs_md)
    write_text_atomic(sweep_dir / "runs.csv", format_run_table(results, "csv"))
    notes = dropped_notes(dropped, run_jobs)
    if table is not None:
        md = format_paper(table, "md")
        write_text_atomic(sweep_dir / "table.md", md + notes + "\n")
        write_text_atomic(sweep_dir / "table.tex", format_paper(table, "latex"))
        write_text_atomic(sweep_dir / "table.csv", format_paper(table, "csv"))
        text = f"{title}\n\n{md}\none row per run:\n\n{runs_md}"
    else:
        write_text_atomic(sweep_dir / "table.md", runs_md + notes + "\n")
        text = f"{title}\n\n{runs_md}"
    plots = write_plots(results, table, sweep_dir / "plots", title)
    log.info("sweep table and %d plots written to %s", len(plots), sweep_dir)
    return text + notes
