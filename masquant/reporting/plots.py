"""Figures beside the tables (PNG, matplotlib's Agg backend: no display needed).

- :func:`plot_table_bars`: one column of a paper-layout table as bars, one bar per method, grouped by model
  and bits, with the published number as a black tick where there is one;
- :func:`layer_sqnr_frames` + :func:`plot_layer_sqnr`: SQNR vs FP at every decoder layer's output, per
  modality (``fidelity/sqnr/<modality>/layer_<i>``), one line per run;
- :func:`plot_channel_absmax`: per-channel max |x| per modality at one layer's input (the paper's Fig. 2 kind);
- :func:`plot_rank_energy`: the cumulative singular-value energy of ΔW, plain and whitened (CMC's rank choice).

Each function writes one PNG and returns its path (None when there is nothing to draw).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd

from masquant.evaluation.metrics import SQNR_KEY



def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _finite(value) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def plot_table_bars(table, column: str, path: str | Path, title: str = "") -> Path | None:
    """Bars of ``column`` (a label of ``table.columns``) of a :class:`~masquant.reporting.paper.PaperTable`: groups
    (model, bits), one bar per method (its std as an error bar), the paper's number as a black tick."""
    frame = table.frame
    if column not in frame or not frame[column].map(_finite).any():
        return None
    plt = _pyplot()
    frame = frame[frame[column].map(_finite)]  # rows without a number (the dense SQNR of inf) take no slot
    groups = list(dict.fromkeys(zip(frame["model"], frame["bits"])))
    methods = sorted(dict.fromkeys(frame["method"]), key=_method_rank)  # the paper's order, as the table's rows
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) * max(1, len(methods)) * 0.45), 3.6))
    colors = plt.get_cmap("tab10")
    paper = f"{column} paper"
    for j, method in enumerate(methods):
        rows = frame[frame["method"] == method]
        xs, ys, errs = [], [], []
        for i, group in enumerate(groups):
            row = rows[(rows["model"] == group[0]) & (rows["bits"] == group[1])]
            if row.empty or not _finite(row[column].iloc[0]):
                continue
            x = i + (j - (len(methods) - 1) / 2) * width
            xs.append(x)
            ys.append(float(row[column].iloc[0]))
            std = row[f"{column} std"].iloc[0]
            errs.append(float(std) if _finite(std) else 0.0)
            if paper in row and _finite(row[paper].iloc[0]):
                ax.plot([x - width / 2, x + width / 2], [row[paper].iloc[0]] * 2, color="black", lw=2)
        ax.bar(xs, ys, width, yerr=errs if any(errs) else None, label=method, color=colors(j % 10), capsize=2)
    ax.set_xticks(range(len(groups)), [f"{m}\n{b}" if len({g[0] for g in groups}) > 1 else str(b)
                                       for m, b in groups], fontsize=8)
    ax.set_ylabel(column)
    ax.set_title(title or column, fontsize=10)
    if frame.get(paper) is not None and frame[paper].map(_finite).any():
        ax.plot([], [], color="black", lw=2, label="paper")
    ax.legend(fontsize=7, ncol=min(4, len(methods) + 1), loc="upper center", bbox_to_anchor=(0.5, -0.14),
              frameon=False)
    return _save(fig, path)


def _method_rank(label: str) -> tuple[int, str]:
    from masquant.methods.registry import method_order
    from masquant.reporting.paper import parse_method_label

    return (*method_order(parse_method_label(label.split(" ")[0])[0]), label)


def run_label(result: Mapping) -> str:
    return f"{result.get('run/method_label', result.get('run/method'))} {result.get('run/bits')}"


def layer_sqnr_frames(results: Sequence[Mapping]) -> dict[str, pd.DataFrame]:
    """{modality: frame indexed by layer, one column per run (method label and bits)} from the
    ``fidelity/sqnr/<modality>/layer_<i>`` metrics; runs without them (dense) are left out."""
    series: dict[str, dict[str, dict[int, float]]] = {}
    for result in results:
        for key, value in result.items():
            m = SQNR_KEY.match(key)
            if m and m["layer"] is not None and _finite(value):
                series.setdefault(m["modality"], {}).setdefault(run_label(result), {})[int(m["layer"])] = value
    return {modality: pd.DataFrame(columns).sort_index() for modality, columns in series.items()}


def plot_layer_sqnr(frame: pd.DataFrame, path: str | Path, title: str = "") -> Path | None:
    """One line per run: SQNR (dB) vs FP at each decoder layer's output."""
    if frame.empty:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.6))
    # colour = method, line style = bits: the runs of one method at several schemes read as one family
    methods = sorted({c.rsplit(" ", 1)[0] for c in frame.columns}, key=_method_rank)
    bits = list(dict.fromkeys(c.rsplit(" ", 1)[-1] for c in frame.columns))
    colors, styles = plt.get_cmap("tab10"), ["-", "--", ":", "-."]
    for label in frame.columns:
        method, scheme = label.rsplit(" ", 1)
        ax.plot(frame.index, frame[label], marker=".", ms=3, lw=1, label=label,
                color=colors(methods.index(method) % 10), ls=styles[bits.index(scheme) % len(styles)])
    ax.set_xlabel("decoder layer")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel("SQNR vs FP (dB)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_channel_absmax(absmax: Mapping, path: str | Path, title: str = "",
                        modalities: Sequence[str] = ("text", "vision", "audio")) -> Path:
    """Fig. 2 style: per-channel max |x| of each modality ({modality: [D_in] tensor}) on one log axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(10, 3.2))
    for m in modalities:
        if m in absmax:
            ax.plot(absmax[m].numpy(), lw=0.8, alpha=0.85, label=m)
    ax.set_xlabel("input channel")
    ax.set_ylabel("max |x|")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper right")
    return _save(fig, path)


def plot_rank_energy(curves: Mapping[str, Sequence[float]], path: str | Path, rank: int | None = None,
                     title: str = "") -> Path:
    """Cumulative singular-value energy (fraction of ‖·‖_F², from 0 to 1) against the rank, one line per curve
    (e.g. "ΔW" and "T ΔW (whitened)"), with CMC's chosen ``rank`` marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), list(curve), lw=1.2, label=name)
    if rank is not None:
        ax.axvline(rank, color="black", ls="--", lw=1, label=f"rank used: {rank}")
    ax.set_xlabel("rank r")
    ax.set_ylabel("energy kept (fraction)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    return _save(fig, path)
