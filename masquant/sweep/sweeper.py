"""The sweeper of ``python -m masquant -m ...``: Hydra's basic sweeper with what a paper-table sweep needs.

1. Jobs: the cartesian product of ``params`` and the command line, or, with ``grids``, the union of one product
   per grid (a paper table is not one product: SmoothQuant has no W4A16 row, AWQ only W4A16). Duplicate jobs
   run once.
2. Before any job runs, every job's configuration (and its dense reference) goes through the same checks as a
   single run (``pipeline.resolve``: keys, values, paths, files, the objective). A bad value in job 7 of 40
   fails the sweep in seconds, listing every bad job, instead of after the first six jobs ran. A method id that
   is not registered in this checkout is named as such, with the registered ones.
   ``drop_unregistered=true`` drops the jobs of the paper's methods that are not registered here (a method
   under development on another branch) and ``drop_inapplicable=true`` the jobs whose method cannot run the
   scheme; both are named in the log and in ``sweep.json``. Any other problem still fails the sweep.
3. A job that fails while running does not stop the sweep: the other jobs run, and the sweep ends with the
   list of failed jobs and their errors (exit status 1). Re-running the command runs only what is missing
   (finished jobs skip themselves).
   ``dry_run=true`` stops there and lists the jobs.
   ``seeds=[0,1,2]`` runs every job once per seed, setting each of ``seed_keys`` the job has (``seed``: torch's
   generator, i.e. learned parts and data order; ``method.seed``: a method's random rotation signs) to it; the
   table then shows each row's mean ± std over those runs and names what varied.
4. When the jobs end, the sweep's results make one table (``sweep.table``: a paper layout, or one row per
   run) written with its plots into the sweep folder: ``table.{md,tex,csv}``, ``plots/*.png``, ``sweep.json``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from omegaconf import OmegaConf, open_dict

log = logging.getLogger(__name__)


SEED_KEYS = ("seed", "method.seed")  # what the ``seeds`` option sets, where a job's configuration has the key


@dataclass
class MasquantSweeperConf:
    _target_: str = "hydra_plugins.masquant_sweeper.masquant_sweeper.MasquantSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[dict] = None
    grids: Optional[list] = None  # [{key: values, ...}, ...]: the jobs are the union of one product per grid
    drop_unregistered: bool = False  # drop jobs of a paper method not registered in this checkout (named)
    drop_inapplicable: bool = False  # drop jobs whose method cannot run the scheme (named)
    report: bool = True  # write the sweep's table and plots into the sweep folder when the jobs end
    dry_run: bool = False  # validate every job, list the jobs that would run and the dropped ones, run nothing
    seeds: Optional[list] = None  # run every job once per seed (mean ± std over them per table row)
    seed_keys: list = field(default_factory=lambda: list(SEED_KEYS))  # set to the seed where the job has them


ConfigStore.instance().store(group="hydra/sweeper", name="masquant", node=MasquantSweeperConf)


def seeded_jobs(jobs: Sequence[Sequence[str]], seeds: Sequence[int] | None) -> list[list[str]]:
    """Every job once per seed (``seed=<s>`` appended; the seed's other keys are added when the job is composed,
    where its configuration has them); ``jobs`` unchanged without seeds."""
    if not seeds:
        return [list(j) for j in jobs]
    return [[*j, f"seed={int(s)}"] for j in jobs for s in seeds]


def seed_overrides(job_cfg, overrides: Sequence[str], keys: Sequence[str]) -> list[str]:
    """``key=<the job's seed>`` for each of ``keys`` (other than ``seed``) that the job's configuration has and
    its overrides do not set."""
    from omegaconf import OmegaConf as _OC

    seed = int(job_cfg.seed)
    return [f"{k}={seed}" for k in keys if k != "seed" and _OC.select(job_cfg, k, default=None) is not None
            and not any(o.split("=", 1)[0].lstrip("+~") == k for o in overrides)]


class SweepError(SystemExit):
    """Ends the process with the sweep's failures (a SystemExit: Hydra prints no traceback)."""


def _as_plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=False) if OmegaConf.is_config(node) else node


def sweep_jobs(params: dict | None, grids: Sequence[dict] | None, arguments: Sequence[str]) -> list[list[str]]:
    """The override list of every job: per grid, the product of ``params``, the grid and ``arguments`` (later
    ones win for the same key, as in Hydra's basic sweeper); the union over grids without duplicates."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    base = [f"{k}={v}" for k, v in (_as_plain(params) or {}).items()]
    jobs, seen = [], set()
    for grid in _as_plain(grids) or [{}]:
        overrides = base + [f"{k}={v}" for k, v in grid.items()] + list(arguments)
        for job in BasicSweeper.split_arguments(parser.parse_overrides(overrides), None)[0]:
            if frozenset(job) not in seen:
                seen.add(frozenset(job))
                jobs.append(job)
    return jobs


def configured_jobs(cfg, arguments: Sequence[str] = ()) -> list[list[str]]:
    """The jobs of a config composed with its Hydra node (``return_hydra_config=True``): its sweeper's params and
    grids with ``arguments`` added to every job."""
    sweeper = cfg.hydra.sweeper
    return sweep_jobs(sweeper.get("params"), sweeper.get("grids"), arguments)


def method_of(overrides: Sequence[str]) -> str | None:
    """The method group chosen by a job's overrides (``method=awq``), or None."""
    chosen = [o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == "method"]
    return chosen[-1] if chosen else None


def unregistered_problem(method_id: str) -> str | None:
    """None when ``method_id`` is registered; else what to say (the registered ids, the modules that failed)."""
    from masquant.methods.registry import _FAILED, method_ids

    if method_id in method_ids():
        return None
    failed = "".join(f"; {m} failed to import: {e}" for m, e in _FAILED.items())
    return (f"method={method_id} is not registered in this checkout (registered: {', '.join(method_ids())}){failed}")


def paper_method(method_id: str) -> bool:
    from masquant.reporting.paper import PAPER_METHODS

    return method_id in PAPER_METHODS


def inapplicable(job_cfg) -> str | None:
    """Why the job's method cannot run its scheme or modalities (the method's own ``check``), or None."""
    from masquant.errors import MethodConfigError
    from masquant.app.pipeline import scheme_from_cfg
    from masquant.methods.registry import get_method_class

    try:
        method = get_method_class(str(job_cfg.method.id))(OmegaConf.to_object(job_cfg.method))
        modalities = tuple(str(getattr(m, "value", m)) for m in job_cfg.modality.modalities)
        method.check(scheme_from_cfg(job_cfg.quant), modalities)
    except MethodConfigError as err:
        return f"method={job_cfg.method.id} quant={job_cfg.quant.name}: {err}"
    except Exception:  # noqa: BLE001 - anything else is reported by job_problems
        return None
    return None


def job_problems(job_cfg, run_dirs: list | None = None) -> list[str]:
    """ConfigErrors of one sweep job's configuration and of its dense reference (no model is loaded); the run
    folders of both are appended to ``run_dirs``."""
    from masquant.app.objective import objective_problems
    from masquant.app.pipeline import ConfigError, resolve
    from masquant.app.main import invocation_configs

    cfg = job_cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    problems = []
    try:
        for c in invocation_configs(cfg):
            spec = resolve(c)
            if run_dirs is not None:
                run_dirs.append(spec.run_dir)
        problems += objective_problems(cfg)
    except ConfigError as err:
        problems.append(str(err))
    except Exception as err:  # noqa: BLE001 - e.g. an interpolation that does not resolve
        problems.append(f"{type(err).__name__}: {err}")
    return problems


@dataclass
class SweepPlan:
    jobs: list[list[str]] = field(default_factory=list)  # the jobs that run
    run_dirs: list = field(default_factory=list)  # their result folders (dense references included)
    dropped: list[tuple[list[str], str]] = field(default_factory=list)  # (job, why)
    bad: list[tuple[list[str], list[str]]] = field(default_factory=list)  # (job, problems)


class SweeperLogic(Sweeper):
    """Subclassed as hydra_plugins.masquant_sweeper.masquant_sweeper.MasquantSweeper (Hydra's plugin rule).

    Not a subclass of Hydra's BasicSweeper: Hydra re-imports its core plugins while scanning, so that
    class object is not stable; its static ``split_arguments`` (the cartesian product) is reused.
    """

    def __init__(self, max_batch_size: Optional[int] = None, params: Optional[dict] = None,
                 grids: Optional[list] = None, drop_unregistered: bool = False, drop_inapplicable: bool = False,
                 report: bool = True, dry_run: bool = False, seeds: Optional[list] = None,
                 seed_keys: Optional[list] = None):
        super().__init__()
        self.max_batch_size = max_batch_size
        self.params = params or {}
        self.grids = grids
        self.drop_unregistered, self.drop_inapplicable, self.report = drop_unregistered, drop_inapplicable, report
        self.dry_run = dry_run
        self.seeds = [int(x) for x in seeds] if seeds else None
        self.seed_keys = list(seed_keys) if seed_keys is not None else list(SEED_KEYS)
        unknown = [k for k in self.seed_keys if k not in ("seed", "method.seed", "calib.seed")]
        if unknown:
            raise SweepError(f"masquant: hydra.sweeper.seed_keys={self.seed_keys}: {unknown} cannot be varied as a seed; "
                             "valid keys: ['seed', 'method.seed', 'calib.seed']")
        self.hydra_context = self.config = self.launcher = None

    def setup(self, *, hydra_context, task_function, config) -> None:
        from hydra.core.plugins import Plugins

        self.hydra_context, self.config = hydra_context, config
        self.launcher = Plugins.instance().instantiate_launcher(hydra_context=hydra_context,
                                                                task_function=task_function, config=config)

    def plan(self, jobs: Sequence[Sequence[str]]) -> SweepPlan:
        """Every job composed and checked (no model is loaded): kept, dropped (with why) or bad (with problems)."""
        loader = self.hydra_context.config_loader
        plan = SweepPlan()
        for overrides in jobs:
            overrides = list(overrides)
            method_id = method_of(overrides)
            missing = unregistered_problem(method_id) if method_id is not None else None
            if missing is not None:
                if self.drop_unregistered and paper_method(method_id):
                    plan.dropped.append((overrides, missing))
                else:
                    hint = (" (or add hydra.sweeper.drop_unregistered=true to run the registered methods only)"
                            if paper_method(method_id) else "")
                    plan.bad.append((overrides, [missing + hint]))
                continue
            try:
                job_cfg = loader.load_sweep_config(master_config=self.config, sweep_overrides=overrides)
                extra = seed_overrides(job_cfg, overrides, self.seed_keys) if self.seeds else []
                if extra:
                    overrides += extra
                    job_cfg = loader.load_sweep_config(master_config=self.config, sweep_overrides=overrides)
            except Exception as err:  # noqa: BLE001 - composition errors name the key and the valid choices
                plan.bad.append((overrides, [f"{type(err).__name__}: {err}"]))
                continue
            reason = inapplicable(job_cfg) if self.drop_inapplicable else None
            if reason is not None:
                plan.dropped.append((overrides, reason))
                continue
            run_dirs: list = []
            problems = job_problems(job_cfg, run_dirs)
            if problems:
                plan.bad.append((overrides, problems))
            else:
                plan.jobs.append(overrides)
                plan.run_dirs += [d for d in run_dirs if d not in plan.run_dirs]
        return plan

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        plan = self.plan(batch)
        if plan.bad:
            lines = [f"  job {' '.join(o) or '(no overrides)'}:\n    " + "\n    ".join(p) for o, p in plan.bad]
            raise SweepError(f"masquant: {len(plan.bad)} of {len(batch)} sweep jobs have configuration errors; "
                             "nothing was run:\n" + "\n".join(lines))

    def sweep(self, arguments: list[str]) -> Any:
        """Every job validated first; then the jobs run, failed ones are collected instead of ending the sweep,
        and the finished results make the sweep's table."""
        from masquant.reporting.sweep_report import write_sweep_record

        jobs = seeded_jobs(sweep_jobs(self.params, self.grids, arguments), self.seeds)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        plan = self.plan(jobs)
        if plan.bad:
            lines = [f"  job {' '.join(o) or '(no overrides)'}:\n    " + "\n    ".join(p) for o, p in plan.bad]
            raise SweepError(f"masquant: {len(plan.bad)} of {len(jobs)} sweep jobs have configuration errors; "
                             "nothing was run:\n" + "\n".join(lines))
        for overrides, why in plan.dropped:
            log.warning("sweep job %s dropped: %s", " ".join(overrides), why)
        if not plan.jobs:
            raise SweepError(f"masquant: all {len(jobs)} sweep jobs were dropped; nothing to run")
        if self.dry_run:
            from masquant.reporting.sweep_report import dropped_notes
            from masquant.runs.store import is_finished

            done = sum(is_finished(d) for d in plan.run_dirs)
            common = set.intersection(*(set(j) for j in plan.jobs + [j for j, _ in plan.dropped]))
            lines = "".join(f"\n  #{i}: {' '.join(o for o in j if o not in common)}" for i, j in enumerate(plan.jobs))
            print(f"dry run: {len(plan.jobs)} jobs valid ({done} of their {len(plan.run_dirs)} results, dense references "
                  f"included, already finished); nothing was run{lines}{dropped_notes(plan.dropped, plan.jobs)}")
            return []
        size = self.max_batch_size or len(plan.jobs)
        returns, failed = [], []
        for start in range(0, len(plan.jobs), size):
            results = self.launcher.launch(plan.jobs[start:start + size], initial_job_idx=start)
            for r in results:
                if r.status != JobStatus.COMPLETED:
                    err = r._return_value
                    failed.append((r.overrides, f"{type(err).__name__}: {err}"))
                    log.error("sweep job %s failed: %s: %s", " ".join(r.overrides or []), type(err).__name__, err)
            returns.append(results)
        write_sweep_record(sweep_dir, plan, failed)
        if self.report:
            self._report(sweep_dir, plan)
        if failed:
            lines = "\n".join(f"  job {' '.join(o or [])}: {e}" for o, e in failed)
            raise SweepError(f"masquant: {len(failed)} of {len(plan.jobs)} sweep jobs failed (the others finished; "
                             f"re-running the command runs only what is missing):\n{lines}")
        return returns

    def _report(self, sweep_dir: Path, plan: SweepPlan) -> None:
        """The sweep's table and plots; a failure here is logged and never fails a sweep whose jobs finished."""
        from masquant.reporting.sweep_report import sweep_report

        try:
            text = sweep_report(self.config, plan.run_dirs, sweep_dir, dropped=plan.dropped, run_jobs=plan.jobs)
        except Exception as err:  # noqa: BLE001
            log.error("sweep table not written: %s: %s", type(err).__name__, err)
            return
        print(f"\n{text}\n(table, plots and sweep.json in {sweep_dir})\n")  # the CLI's output, like main()'s table
