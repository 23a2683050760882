"""What made a result: the code (git commit, dirty flag), the library versions, the machine, the format.

Every ``metrics.json`` carries :func:`provenance` under ``provenance/*``. ``RESULTS_FORMAT`` (in
:mod:`masquant.runs.store`) is part of the config hash, so bumping it makes every earlier result a
different configuration: nothing stale is skipped as finished. ``python -m masquant.reporting --stale`` lists
results made by another commit or another format (:func:`stale_reasons`).
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import subprocess
from importlib import metadata
from pathlib import Path

import torch

from masquant.runs.store import RESULTS_FORMAT

log = logging.getLogger(__name__)
UNKNOWN = "unknown"
SOURCE_DIR = Path(__file__).resolve().parents[2]  # the checkout (or site-packages) holding masquant/
PACKAGES = ("torch", "transformers", "lmms_eval", "masquant")


def _git(args: list[str], cwd: Path) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_state(source: Path = SOURCE_DIR) -> dict[str, object]:
    """{"commit": full hash or "unknown", "dirty": True/False (tracked files changed) or "unknown"}.

    "unknown" when the code is not in a git checkout (an installed wheel) or git is missing."""
    commit = _git(["rev-parse", "HEAD"], source)
    if not commit:
        return {"commit": UNKNOWN, "dirty": UNKNOWN}
    status = _git(["status", "--porcelain", "--untracked-files=no"], source)
    return {"commit": commit, "dirty": UNKNOWN if status is None else bool(status)}


def package_versions(packages=PACKAGES) -> dict[str, str]:
    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name.replace("_", "-"))
        except metadata.PackageNotFoundError:
            versions[name] = UNKNOWN
    return versions


def device_description(device) -> str:
    """e.g. "cuda:0 NVIDIA H200" or "cpu x86_64, 2 threads"."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    return f"{device.type} {platform.machine()}, {torch.get_num_threads()} threads"


def numerics_settings() -> dict[str, object]:
    """What decides whether a result reproduces bit for bit: torch's intra-op threads (a reduction split over
    another number of threads sums in another order), the deterministic-algorithms switch, cuDNN's flags, the
    float32 matmul precision (TF32 on GPUs) and the CPU's vector ISA."""
    record: dict[str, object] = {
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "cudnn_deterministic": torch.backends.cudnn.deterministic,
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    return {f"provenance/numerics/{k}": v for k, v in record.items()}


def provenance(device) -> dict[str, object]:
    """The ``provenance/*`` keys of a result (the wall time is added by the pipeline when the run ends)."""
    git = git_state()
    record: dict[str, object] = {
        "provenance/git_commit": git["commit"],
        "provenance/git_dirty": git["dirty"],
        "provenance/format": RESULTS_FORMAT,
        "provenance/host": socket.gethostname(),
        "provenance/device": device_description(device),
        "provenance/python": platform.python_version(),
        "provenance/slurm_job": os.environ.get("SLURM_JOB_ID", ""),
    }
    record.update({f"provenance/version/{name}": v for name, v in package_versions().items()})
    record.update(numerics_settings())
    return record


def stale_reasons(result: dict, commit: str, results_format: int = RESULTS_FORMAT) -> list[str]:
    """Why a result is not from this code: another commit, another results format, or no provenance at all.

    ``commit`` is the current one (:func:`git_state`); a result from a dirty tree at the current commit is not
    called stale (its diff is unknown), but a result whose commit is "unknown" is."""
    if "provenance/git_commit" not in result:
        return ["no provenance (made before provenance was recorded)"]
    reasons = []
    made_by = str(result["provenance/git_commit"])
    if made_by == UNKNOWN or made_by != commit:
        reasons.append(f"commit {made_by[:12]} (now {commit[:12]})")
    if result.get("provenance/format") != results_format:
        reasons.append(f"results format {result.get('provenance/format')} (now {results_format})")
    return reasons
