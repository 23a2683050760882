"""AWQ's quantize-stage CPU time beside llm-compressor's AWQ on the same model, corpus and thread count.

    .venv/bin/python benchmarks/awq_speed.py                                  # ours; the recorded anchor beside it
    .venv/bin/python benchmarks/awq_speed.py --anchor-python <venv>/bin/python   # measure the anchor too
    .venv/bin/python benchmarks/awq_speed.py --rows awq-w4a16-g64 method.clip=false
    .venv/bin/python benchmarks/awq_speed.py --rows awq-w4a16-g64,awq-w4a16-g64-bf16 --anchor-python <venv>/bin/python

Ours: the ``benchmarks/text_ppl.py`` rows ``awq-w4a16-g64`` / ``awq-w4a16-g128`` (testbed language model,
``calib=text calib.n_samples=8``: 8 sequences of 256 tokens), or ``awq-w4a16-g64-bf16`` (the opt-in bfloat16
scale search, ``method.search_precision=bf16``), run afresh (``force=true``) into ``--output-root``;
the figure is the run's ``time/quantize_cpu_s`` (``time.process_time`` over the quantize stage: input capture,
statistics, searches, deploy; all threads of the process) and ΔPPL on the 32 held-out sequences.

Anchor: ``benchmarks/awq_anchor_llmcompressor.py`` run by ``--anchor-python`` (a venv with llmcompressor, kept
outside the project) in a subprocess on the plain SmolLM2 folder the testbed's language model comes from, with
the same 8 calibration and 32 held-out sequences (written here with the testbed's tokenizer) and the same thread
count: ``oneshot`` with ``AWQModifier`` + W4A16 symmetric per group (llm-compressor has no clip search). Its CPU
time is ``time.process_time`` around ``oneshot`` (the comparable figure); the whole child (imports, load,
perplexity) is also given, from ``getrusage(RUSAGE_CHILDREN)``. The anchor is measured once per group size
and command, right after the first of our rows that needs it; every row of that group size is compared to it.

Every figure is printed with the date, the load average and the torch thread count. CPU time is the figure to
compare on a shared machine; it still grows somewhat when other jobs share the cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from hydra import compose, initialize_config_dir  # noqa: E402

from masquant.app.config import register_configs  # noqa: E402
from masquant.app.main import CONF_DIR, run_with_reference  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from text_ppl import BASE, ROWS  # noqa: E402

TESTBED_WIDTHS = (576, 1536)  # the input widths of the testbed language model's linears
ANCHOR_SCRIPT = Path(__file__).resolve().parent / "awq_anchor_llmcompressor.py"
# group size -> the anchor as last measured (docs/methods/awq.md, "Speed"): oneshot CPU s, ΔPPL, date, load, command
RECORDED_ANCHOR: dict[int, dict] = {
    64: {"oneshot_cpu_s": 215.1, "child_cpu_s": 319.7, "dppl": 3.84,
         "when": "2026-12-03T18:16:57, load average 4.74 4.71 4.26, torch threads 2 (llmcompressor 0.14.0.1, torch "
                 "2.13.0+cpu, duo_scaling true)"},
}
ANCHOR_COMMAND = "python benchmarks/awq_speed.py --anchor-python <llmcompressor venv>/bin/python"


def stamp(threads: int) -> str:
    load = os.getloadavg()
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')}, load average {load[0]:.2f} {load[1]:.2f} "
            f"{load[2]:.2f}, torch threads {threads}")


def row_group_size(overrides: list[str]) -> int:
    for o in overrides:
        if o.startswith("quant.w_group_size="):
            return int(o.split("=", 1)[1])
    return 128  # quant=w4a16_g128


def ours(row: str, output_root: str, threads: int, extra: list[str]) -> dict:
    """One fresh run of a text_ppl row: quantize CPU / wall s, ΔPPL, and when it was measured."""
    cfg = compose(config_name="config", overrides=[*BASE, *ROWS[row][0], f"paths.output_root={output_root}",
                                                    f"threads={threads}", "force=true", *extra])
    *_, m = run_with_reference(cfg)
    import torch

    return {"cpu_s": m["time/quantize_cpu_s"], "wall_s": m["time/quantize_s"],
            "dppl": m["fidelity/ppl"] - m["fidelity/ppl_fp"], "ppl": m["fidelity/ppl"], "ppl_fp": m["fidelity/ppl_fp"],
            "when": stamp(torch.get_num_threads())}


def write_token_ids(path: Path, n_calib: int) -> Path:
    """The calibration and perplexity sequences of ``calib=text`` / ``eval.ppl`` with the testbed's tokenizer, and
    the plain SmolLM2 folder the testbed was converted from (its language model's weights)."""
    import torch

    from masquant.evaluation.text_corpus import corpus_parts, evenly_spaced, token_sequences
    from masquant.testbed.model import SMOLLM2_SUBDIR, TESTBED_VERSION, ensure_converted

    cfg = compose(config_name="config", overrides=[*BASE, f"calib.n_samples={n_calib}"])
    folder = ensure_converted(Path(cfg.paths.cache_dir).expanduser() / "testbed" / f"testbed-vl-{TESTBED_VERSION}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    calib_text, held_text = corpus_parts()
    calib = evenly_spaced(token_sequences(tok, calib_text, int(cfg.calib.seq_len)), n_calib)
    held = evenly_spaced(token_sequences(tok, held_text, int(cfg.eval.ppl_seq_len)), int(cfg.eval.ppl_sequences))
    torch.save({"calib": calib, "held_out": held}, path)
    return folder / SMOLLM2_SUBDIR


def anchor(python: str, group_size: int, threads: int, n_calib: int, workdir: Path, duo: str) -> dict | None:
    """llm-compressor's AWQ in a subprocess: oneshot CPU s (its own process_time) and the whole child's CPU s.
    None when it refuses the setting: compressed-tensors needs every input width to be a multiple of the group
    (the testbed's 576 is not one of 128)."""
    if any(width % group_size for width in TESTBED_WIDTHS):
        print(f"anchor: llm-compressor refuses group {group_size} (input widths {TESTBED_WIDTHS} must be multiples "
              "of the group); no anchor for this row", file=sys.stderr)
        return None
    ids = workdir / "ids.pt"
    model_dir = write_token_ids(ids, n_calib)
    out = workdir / f"anchor_g{group_size}.json"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": ""}
    subprocess.run([python, str(ANCHOR_SCRIPT), "--model", str(model_dir), "--ids", str(ids), "--out", str(out),
                    "--threads", str(threads), "--group-size", str(group_size), "--duo-scaling", duo],
                   check=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.read_text())
    result["child_cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    result["dppl"] = result["ppl_quant"] - result["ppl_dense"]
    result["when"] = stamp(threads)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="awq-w4a16-g64,awq-w4a16-g128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output-root", default=None, help="run folder root (default: a temporary folder)")
    p.add_argument("--anchor-python", default=None, help="python of a venv with llmcompressor: measure the anchor")
    p.add_argument("--anchor-duo-scaling", default="true", choices=("true", "false", "both"),
                   help="AWQModifier(duo_scaling=...): llm-compressor's default is true")
    p.add_argument("--skip-ours", action="store_true", help="only the anchor")
    p.add_argument("overrides", nargs="*", help="extra Hydra overrides for our runs")
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    register_configs()
    rows = args.rows.split(",")
    for r in rows:
        if r not in ROWS or not r.startswith("awq"):
            p.error(f"unknown row {r!r}; AWQ rows: {[k for k in ROWS if k.startswith('awq')]}")
    results = []
    measured: dict[int, dict | None] = {}  # group size -> the anchor measured in this command
    with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        root = args.output_root or str(Path(tmp) / "runs")
        for r in rows:
            g = row_group_size(ROWS[r][0])
            n_calib = int(next(o.split("=")[1] for o in ROWS[r][0] if o.startswith("calib.n_samples=")))
            mine = None if args.skip_ours else ours(r, root, args.threads, args.overrides)
            if args.anchor_python:
                if g not in measured:
                    measured[g] = anchor(args.anchor_python, g, args.threads, n_calib, Path(tmp),
                                         args.anchor_duo_scaling)
                    if measured[g] is not None:
                        print(f"anchor g{g}: {json.dumps(measured[g])}", file=sys.stderr)
                theirs = measured[g]
            else:
                theirs = RECORDED_ANCHOR.get(g)
            results.append((r, mine, theirs))
    print(f"\nAWQ quantize-stage CPU time, ours vs llm-compressor (its W4A16 symmetric; 8 x 256-token sequences; "
          f"{args.threads} threads)\n")
    print("| row | ours CPU s | ours wall s | ours ΔPPL | anchor oneshot CPU s | anchor child CPU s | anchor ΔPPL "
          "| ratio ours / anchor | ours measured | anchor measured |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r, mine, theirs in results:
        if mine:
            print(f"ours {r}: {json.dumps(mine)}", file=sys.stderr)
        def f(d, k, spec=".1f"):
            return "-" if not d or d.get(k) is None else format(d[k], spec)
        ratio = (mine["cpu_s"] / theirs["oneshot_cpu_s"]) if mine and theirs else None
        print(f"| {r} | {f(mine, 'cpu_s')} | {f(mine, 'wall_s')} | {f(mine, 'dppl', '+.2f')} | "
              f"{f(theirs, 'oneshot_cpu_s')} | {f(theirs, 'child_cpu_s')} | {f(theirs, 'dppl', '+.2f')} | "
              f"{'-' if ratio is None else f'{ratio:.2f}'} | {mine['when'] if mine else '-'} | "
              f"{theirs['when'] if theirs else '-'} |")
    if not args.anchor_python:
        print(f"\nanchor: recorded figures (docs/methods/awq.md), measured by `{ANCHOR_COMMAND}`")
    else:
        print("\nanchor: " + "; ".join(f"{t['tool']}, torch {t['torch']}, duo_scaling {t['duo_scaling']}"
                                       for _, _, t in results[:1] if t))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
