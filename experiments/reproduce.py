"""Reproduce one experiment (a paper table): its sweep, its table beside the paper's numbers, its plots.

    .venv/bin/python experiments/reproduce.py table1_testbed                  # CPU: the testbed version of Table 1
    .venv/bin/python experiments/reproduce.py table1_qwen25vl calib.path=/data/coco128.jsonl device=cuda
    .venv/bin/python experiments/reproduce.py table5_testbed method.epochs=1  # any override reaches every job

1. ``python -m masquant -m experiment=<name>`` in this process (Hydra's multirun with the masquant sweeper:
   every job validated first, jobs in sequence, finished ones skipped, so re-running resumes), with
   ``hydra.sweeper.drop_unregistered=true``: the paper's methods not registered in a checkout (a
   method under development on another branch) are dropped and named under the table, the rest runs;
2. the sweep writes ``<output_root>/tables/<name>/table.{md,tex,csv}``, ``runs.{md,csv}`` and ``plots/*.png``
   and prints the table (the paper's layout, with its numbers and the deltas);
3. for a sweep with MASQuant jobs, the MASQuant figures (per-modality activation ranges, CMC rank/energy
   curve) of the W4A8 job, or else its first MASQuant job, from the FP model: ``plots/channel_absmax_*.png``,
   ``plots/cmc_rank_energy_*.png`` (kept when present).
Exit status: the sweep's (1 when a job failed: the others finished; re-run to retry only what is missing).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("WANDB_MODE", "offline")

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.global_hydra import GlobalHydra  # noqa: E402

from masquant.app.config import register_configs  # noqa: E402
from masquant.app.main import CONF_DIR  # noqa: E402

log = logging.getLogger("reproduce")


def compose_config(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def single_valued(overrides: list[str]) -> list[str]:
    """The overrides that are not sweeps (``quant=w8a8,w4a8`` is one): what every job shares, e.g. the output root."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o for o, p in zip(overrides, parsed) if not p.is_sweep_override()]


def run_sweep(experiment: str, sweep_dir: Path, overrides: list[str]) -> int:
    """``python -m masquant -m experiment=<experiment> ...`` in this process; its exit status."""
    from masquant.app.main import main

    argv = sys.argv
    sys.argv = ["masquant", "-m", f"experiment={experiment}", "hydra.sweeper.drop_unregistered=true",
                f"hydra.sweep.dir={sweep_dir}", *overrides]
    GlobalHydra.instance().clear()
    try:
        main()
        return 0
    except SystemExit as exit_:
        if exit_.code not in (0, None):
            print(exit_.code if not isinstance(exit_.code, int) else "", file=sys.stderr)
        return exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()


def figure_job(jobs: list[list[str]]) -> list[str] | None:
    """The job whose MASQuant figures are drawn: MASQuant at W4A8, else the first MASQuant job."""
    masquant = [j for j in jobs if "method=masquant" in j]
    return next((j for j in masquant if "quant=w4a8" in j), masquant[0] if masquant else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("experiment", help="a file of conf/experiment/ without .yaml, e.g. table1_testbed")
    parser.add_argument("--out", type=Path, help="the sweep folder (default: <paths.output_root>/tables/<experiment>)")
    parser.add_argument("--layer", type=int, help="decoder layer of the MASQuant figures (default: the middle one)")
    parser.add_argument("--no-figures", action="store_true", help="skip the MASQuant figures (they load the model)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every job, e.g. paths.output_root=/scratch")
    args = parser.parse_intermixed_args(argv)  # flags may come after the overrides
    if not (Path(CONF_DIR) / "experiment" / f"{args.experiment}.yaml").exists():
        names = sorted(p.stem for p in (Path(CONF_DIR) / "experiment").glob("*.yaml"))
        parser.error(f"no experiment {args.experiment!r}; experiments: {', '.join(names)}")
    register_configs()
    base = compose_config([f"experiment={args.experiment}", *single_valued(args.overrides)])
    sweep_dir = (args.out or Path(base.paths.output_root) / "tables" / args.experiment).resolve()
    status = run_sweep(args.experiment, sweep_dir, args.overrides)
    from masquant.reporting.sweep_report import RECORD, read_sweep_record

    if not (sweep_dir / RECORD).exists():
        return status or 1
    job = None if args.no_figures else figure_job(read_sweep_record(sweep_dir)["jobs"])
    plots = sweep_dir / "plots"
    if job is not None and not list(plots.glob("channel_absmax_layer*.png")):
        from masquant.app.figures import masquant_figures

        figures = masquant_figures(compose_config(job), plots, args.layer)
        print("MASQuant figures (" + " ".join(job[:3]) + "): " + ", ".join(str(p) for p in figures.values()))
    print(f"tables and plots: {sweep_dir}  (table.md, table.tex, table.csv, runs.md, plots/)")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
