"""The benchmark stage of a run: lmms-eval on the in-memory model, on local task data or on synthetic documents a
source makes (``eval.testbed_docs``)."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def testbed_data_root(cfg, out_dir: Path) -> Path:
    """Write the testbed's synthetic documents for each task (deterministic) under the cache."""
    import datasets

    from masquant.evaluation import write_local_task_data
    from masquant.sources import task_documents

    datasets.disable_progress_bars()

    root = Path(cfg.paths.cache_dir).expanduser() / "testbed_tasks" / f"n{cfg.eval.testbed_docs}"
    for task in cfg.eval.tasks:
        marker = root / task / ".complete"
        if not marker.exists():
            n = int(cfg.eval.testbed_docs)
            docs = task_documents(task)(task, n)
            write_local_task_data(task, docs, root)
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text("ok")
    return root


def run_benchmarks(cfg, model, processor, out_dir: Path) -> dict:
    from masquant.evaluation import evaluate_lmms

    if cfg.eval.data_root:
        data_root = Path(str(cfg.eval.data_root)).expanduser()
    elif cfg.eval.testbed_docs > 0:
        data_root = testbed_data_root(cfg, out_dir)
    else:
        data_root = None
    limit = cfg.eval.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    return evaluate_lmms(
        model, processor, list(cfg.eval.tasks), limit=limit, data_root=data_root, output_dir=out_dir,
        batch_size=int(cfg.eval.batch_size), max_new_tokens=int(cfg.eval.max_new_tokens),
        min_pixels=cfg.eval.min_pixels, max_pixels=cfg.eval.max_pixels,
        max_new_tokens_cap=cfg.eval.get("max_new_tokens_cap"),
        max_new_tokens_per_task=dict(cfg.eval.get("max_new_tokens_per_task") or {}),
    )
