"""One job of a one-process sweep must not leak into the next (Hydra's basic launcher runs them in sequence).

:func:`job_scope` removes and closes the log handlers the job added, restores torch's thread count, resets the
random generators (Python, NumPy, torch) to seed 0 and frees memory (``gc`` and, on GPUs, the CUDA cache) when the
job ends, however it ends. (Each run seeds itself with its own ``seed`` before it computes: ``pipeline.run``.)
"""

from __future__ import annotations

import gc
import logging
from contextlib import contextmanager

import torch


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


@contextmanager
def job_scope():
    from masquant.app.pipeline import seed_everything

    loggers = [logging.getLogger(), logging.getLogger("masquant")]
    handlers = [list(lg.handlers) for lg in loggers]
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        for lg, before in zip(loggers, handlers):
            for handler in [h for h in lg.handlers if h not in before]:
                lg.removeHandler(handler)
                handler.close()
        torch.set_num_threads(threads)
        seed_everything(0)
        release_memory()
