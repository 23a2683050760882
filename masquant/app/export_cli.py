"""``python -m masquant.export <run folder> [export.* keys]`` or ``python -m masquant.export <overrides>`` (its
entry point: ``masquant/export/__main__.py``).

A run folder (``<output_root>/runs/<model>/<method>/<quant>-<hash>``) must hold a finished run; its configuration
(``config.yaml``) is quantized again (the quantization is deterministic) and exported into ``<run folder>/export``,
replacing an earlier export. Overrides are a normal run with ``export=compressed_tensors`` added: a finished run of
the same configuration is exported without re-running its benchmarks.
"""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger("masquant")


def run_folder_config(folder: Path, overrides: list[str] = ()):
    """The configuration of the finished run in ``folder`` (its ``config.yaml`` over the schemas, the method's
    included), with ``export=compressed_tensors`` and ``overrides`` (``export.*`` keys only)."""
    from hydra import compose, initialize_config_dir

    from masquant.app.config import register_configs
    from masquant.app.main import CONF_DIR
    from masquant.app.pipeline import ConfigError
    from masquant.runs.store import RESULT_FILE, is_finished

    saved = folder / "config.yaml"
    if not is_finished(folder) or not saved.is_file():
        raise ConfigError(f"{folder}: not a finished run folder (it needs {RESULT_FILE} and config.yaml; a run that "
                          "was interrupted or is still running cannot be exported)")
    values = OmegaConf.load(saved)
    bad = [o for o in overrides if not o.split("=", 1)[0].lstrip("+").startswith("export.")]
    if bad:
        raise ConfigError(f"{bad}: after a run folder only export.* keys can be set (its configuration is the run's)")
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"method={values.method.id}", "export=compressed_tensors"])
        exports = compose(config_name="config", overrides=["export=compressed_tensors", *overrides]).export
    values.pop("export", None)
    OmegaConf.set_struct(cfg, False)  # the run's own values (e.g. its per-task dicts) replace the composed defaults
    cfg = OmegaConf.merge(cfg, values)
    cfg.export = exports
    OmegaConf.set_struct(cfg, True)
    cfg.force = False
    return cfg


def export_run_folder(folder: Path, overrides: list[str] = ()) -> dict:
    """Export the finished run in ``folder`` (``overrides``: ``export.*`` keys, e.g. ``export.dtype=bfloat16``)."""
    from masquant.app.pipeline import ConfigError, export_finished, resolve
    from masquant.runs.store import run_lock

    folder = folder.resolve()
    spec = resolve(run_folder_config(folder, overrides))
    if not folder.name.endswith(f"-{spec.config_hash}"):
        raise ConfigError(f"{folder}: its config.yaml now composes to config hash {spec.config_hash}, not the folder's "
                          "(a run of an older results format?); run the configuration again with "
                          "export=compressed_tensors")
    spec = dataclasses.replace(spec, run_dir=folder)
    with run_lock(folder):
        return export_finished(spec)


def main(argv: list[str]) -> None:
    from masquant.app.pipeline import ConfigError

    if argv and Path(argv[0]).is_dir():
        logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
        try:
            metrics = export_run_folder(Path(argv[0]), argv[1:])
        except ConfigError as err:
            raise SystemExit(f"masquant.export: {err}") from None
        print({k: v for k, v in metrics.items() if k.startswith("export/")})
        return
    from masquant.app.main import main as run_main

    sys.argv = [sys.argv[0], *argv, "export=compressed_tensors"]
    run_main()
