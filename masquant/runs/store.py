"""The results store: run folders keyed by the config hash, atomic writes, the finished check, labels.

``<output_root>/runs/<model>/<method>/<quant>-<hash>/`` holds ``metrics.json``, ``config.yaml``,
``run.log`` and lmms-eval's sample logs. A run is written under a temporary sibling name and renamed
when complete, so a folder named like a run with a ``metrics.json`` is always a finished run.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import fields, is_dataclass
from pathlib import Path

log = logging.getLogger(__name__)
RESULT_FILE = "metrics.json"
# Bump when a change alters results (a metric's definition, a default that changes numbers): it is part of the
# config hash, so earlier results are not skipped as finished; `python -m masquant.reporting --stale` lists them.
RESULTS_FORMAT = 1
HOST = socket.gethostname().replace("-", "_")


def run_dir_for(output_root: str | Path, model: str, method: str, quant: str, config_hash: str) -> Path:
    return Path(output_root) / "runs" / str(model).replace("/", "_") / str(method) / f"{quant}-{config_hash}"


def is_finished(run_dir: Path) -> bool:
    return (run_dir / RESULT_FILE).exists()


def load_result(run_dir: Path) -> dict:
    return json.loads((run_dir / RESULT_FILE).read_text())


def partial_dir(run_dir: Path) -> Path:
    """Where a run is written before it is complete (host and pid in the name: stale ones are found)."""
    return run_dir.with_name(f".{run_dir.name}.partial-{HOST}-{os.getpid()}")


def failed_dir(run_dir: Path) -> Path:
    return run_dir.with_name(f".{run_dir.name}.failed")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as err:
        return err.errno == errno.EPERM
    return True


def _owner(folder: Path, kind: str) -> tuple[str, int] | None:
    """(host, pid) from '.<name>.<kind>-<host>-<pid>', or None for another naming."""
    tail = folder.name.rpartition(f".{kind}-")[2]
    host, _, pid = tail.rpartition("-")
    return (host, int(pid)) if pid.isdigit() and host else None


def clean_stale(run_dir: Path) -> list[Path]:
    """Remove what killed processes of this host left for this run (partial folders), and restore a result
    that a killed replacement had moved aside. Call it holding the run's lock. Returns what was removed."""
    removed = []
    for kind in ("partial", "replaced"):
        for folder in run_dir.parent.glob(f".{run_dir.name}.{kind}-*"):
            owner = _owner(folder, kind)
            if owner is None or owner[0] != HOST or _pid_alive(owner[1]):
                continue
            if kind == "replaced" and not run_dir.exists():
                os.replace(folder, run_dir)  # the new result never arrived: the old one is still the result
                log.warning("restored %s, which a killed process (pid %d) was replacing", run_dir, owner[1])
                continue
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
            log.info("removed %s, left by a killed process (pid %d)", folder.name, owner[1])
    return removed


def publish(tmp_dir: Path, run_dir: Path) -> None:
    """Make a finished ``tmp_dir`` the result at ``run_dir``. An existing result is moved aside first and
    removed only after the new one is in place; a kill in between leaves it to :func:`clean_stale`."""
    if run_dir.exists():
        aside = run_dir.with_name(f".{run_dir.name}.replaced-{HOST}-{os.getpid()}")
        os.replace(run_dir, aside)
        os.replace(tmp_dir, run_dir)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp_dir, run_dir)


@contextmanager
def run_lock(run_dir: Path, wait: bool = True):
    """An exclusive lock per run (``.<name>.lock`` beside it): a second process on the same config waits
    for the first and then finds its result. The kernel releases it when the holder dies."""
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    path = run_dir.with_name(f".{run_dir.name}.lock")
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            if not wait:
                raise
            log.warning("%s is being computed by %s; waiting for it to finish", run_dir.name, holder)
            t0 = time.monotonic()
            fcntl.flock(f, fcntl.LOCK_EX)
            log.info("lock on %s acquired after %.0f s", run_dir.name, time.monotonic() - t0)
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {HOST}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def method_label(method_cfg) -> str:
    """Method id plus the options that differ from the method's defaults, e.g. 'masquant(learn=False)'."""
    if not is_dataclass(method_cfg):
        return str(method_cfg.id)
    default = type(method_cfg)()
    diffs = []
    for f in fields(method_cfg):
        value, ref = getattr(method_cfg, f.name), getattr(default, f.name)
        if is_dataclass(value):
            diffs += [f"{f.name}.{g.name}={getattr(value, g.name)}" for g in fields(value)
                      if getattr(value, g.name) != getattr(ref, g.name)]
        elif value != ref:
            diffs.append(f"{f.name}={getattr(value, 'value', value)}")
    return f"{method_cfg.id}({','.join(diffs)})" if diffs else str(method_cfg.id)
