"""The layout docs/layout.md describes: subpackages with one-way dependencies, a core that never imports the testbed
or a baseline, and a repository that stands alone (no absolute path of a machine, no file outside it)."""

from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ("app", "adapters", "calibration", "engine", "evaluation", "export", "methods", "quant", "reporting", "runs", "sweep",
        "transforms")  # the library without its plugins (sources, testbed) and without the baselines


def package_of(module: str) -> str | None:
    """'masquant.<sub>' or 'baselines' (every baseline is one plugin package); None outside the library."""
    parts = module.split(".")
    if parts[0] == "baselines":
        return "baselines"
    if parts[0] == "masquant" and len(parts) > 1:
        return f"masquant.{parts[1]}"
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (a lazy import is a dependency too)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # `from masquant import x`
    return out


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in [*ROOT.glob("masquant/**/*.py"), *ROOT.glob("baselines/**/*.py")]:
        if path.name == "__main__.py":  # an entry point (python -m masquant.<sub>) runs the app: outside the graph
            continue
        source = package_of(module_name(path))
        if source is None:
            continue
        targets = {package_of(m) for m in imports(path)} - {None, source}
        targets = {t for t in targets if (ROOT / t.replace(".", "/")).exists() or (ROOT / f"{t.replace('.', '/')}.py").exists()}
        graph.setdefault(source, set()).update(targets)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_subpackages_depend_one_way():
    cycle = find_cycle(package_graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_core_imports_no_testbed_and_no_baseline():
    """The testbed comes in as a source plugin (masquant.sources), the baselines as method plugins (the registry
    imports them by name): the core works without either."""
    graph = package_graph()
    offenders = {p: sorted(graph.get(f"masquant.{p}", set()) & {"masquant.testbed", "baselines", "masquant.sources"}
                           - ({"masquant.sources"} if p == "app" else set())) for p in CORE}
    assert not {p: o for p, o in offenders.items() if o}, offenders


def test_every_top_level_module_is_a_subpackage_or_the_entry():
    loose = sorted(p.name for p in (ROOT / "masquant").glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "errors.py"], loose


MACHINE_PATH = re.compile(r"(/home/|/nas/|/mnt/|/Users/|/work/|/root/)[A-Za-z]")
OUTSIDE_FILE = re.compile(r"(\.\./)?shared/(specs|notes|reference)/|\.\./shared")


def tracked_text_files() -> list[Path]:
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    return [ROOT / f for f in files if f.endswith((".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt", ".cfg"))
            or f in (".ci/run",)]


def test_no_absolute_path_of_a_machine_and_no_file_outside_the_repository():
    hits = []
    for path in tracked_text_files():
        if not path.is_file():
            continue
        for i, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if MACHINE_PATH.search(line) or OUTSIDE_FILE.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()[:120]}")
    assert not hits, "\n".join(hits)
