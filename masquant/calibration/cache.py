"""On-disk cache of calibration statistics keyed by a hash of what determines them."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path
from typing import Callable

import torch

from masquant.runs.hashing import stable_hash

log = logging.getLogger(__name__)
CACHE_VERSION = 2  # 2: statistics carry per-channel min and max


@torch.no_grad()
def model_fingerprint(model: torch.nn.Module, length: int = 12, sample: int = 65536) -> str:
    """Hash of every parameter's name, shape, dtype and the sum / absolute sum of a strided sample of at
    most ``sample`` of its values (first element included): new weights at the same path (a re-trained
    testbed tower, a re-finetuned checkpoint) get new cache entries, without copying a whole embedding."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        x = flat[:: max(1, flat.numel() // sample)].double()
        h.update(f"{name}:{tuple(p.shape)}:{p.dtype}:{float(x.sum()):.10e}:{float(x.abs().sum()):.10e};".encode())
    return h.hexdigest()[:length]


def atomic_torch_save(obj, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


class StatsCache:
    """``root/<kind>-<hash>.pt`` per key. Entries are written atomically and loaded with
    ``weights_only=True``; one that does not load (truncated, corrupt, foreign) is logged, moved aside as
    ``<name>.corrupt-<time>`` and recomputed, so a bad entry never fails later runs."""

    def __init__(self, root: str | Path | None):
        self.root = None if root is None else Path(root)
        self.hits = 0
        self.misses = 0

    def path_for(self, key: dict) -> Path | None:
        if self.root is None:
            return None
        return self.root / f"{key.get('kind', 'stats')}-{stable_hash({**key, '_v': CACHE_VERSION})}.pt"

    def load(self, key: dict):
        """The cached state for ``key``, or None (no cache, no entry, or an entry that did not load)."""
        path = self.path_for(key)
        if path is None or not path.exists():
            return None
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unreadable entry is recomputed
            aside = path.with_name(f"{path.name}.corrupt-{int(time.time())}")
            log.warning("statistics cache entry %s does not load (%s: %s); moved to %s and recomputed",
                        path, type(err).__name__, err, aside.name)
            try:
                os.replace(path, aside)
            except OSError:
                pass
            return None
        self.hits += 1
        log.info("statistics cache hit: %s", path)
        return state

    def save(self, key: dict, state) -> None:
        self.misses += 1
        path = self.path_for(key)
        if path is not None:
            atomic_torch_save(state, path)
            log.info("statistics cached: %s", path)

    def get_or_compute(self, key: dict, compute: Callable[[], object], to_state=lambda x: x, from_state=lambda x: x):
        state = self.load(key)
        if state is not None:
            return from_state(state)
        value = compute()
        self.save(key, to_state(value))
        return value
