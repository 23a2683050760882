"""``calib.source=file``: calibration rows from a JSON, JSONL or parquet file (``calib.path``) of objects with a
text ``question``, an optional text ``answer`` and optional ``image`` / ``audio`` paths; held-out rows from the
same file (a seeded split) or from ``calib.held_out_path``. Every row is checked before any model loads."""

from __future__ import annotations

import random
from pathlib import Path

from masquant.calibration.data import read_calibration_file, split_rows
from masquant.errors import CalibrationDataError, ConfigError
from masquant.sources.registry import CalibrationSource, register_calibration_source


@register_calibration_source
class CalibrationFile(CalibrationSource):
    name = "file"

    def check(self, cfg, needs_calibration: bool, needs_answers: str | None) -> None:
        if needs_calibration or cfg.eval.fidelity:
            check_calibration_file(cfg.calib, cfg.eval.fidelity, needs_answers)

    def rows(self, ccfg, adapter_cls, n: int, held_out: int):
        rows = read_calibration_file(ccfg.path)
        if ccfg.held_out_path:
            held = read_calibration_file(ccfg.held_out_path)
            if len(rows) < n or len(held) < held_out:
                raise CalibrationDataError(
                    f"calib.path={ccfg.path} has {len(rows)} rows for calib.n_samples={n}; calib.held_out_path="
                    f"{ccfg.held_out_path} has {len(held)} rows for calib.held_out={held_out}")
            idx = sorted(random.Random(int(ccfg.seed)).sample(range(len(rows)), n))
            return [rows[i] for i in idx], held[:held_out], {"source": "file", "rows": idx,
                                                              "held_out_file": str(ccfg.held_out_path)}
        if len(rows) < n + held_out:
            raise CalibrationDataError(f"calib.path={ccfg.path} has {len(rows)} rows; calib.n_samples + "
                                       f"calib.held_out = {n + held_out}")
        calib_idx, held_idx = split_rows(rows, n, held_out, int(ccfg.seed))
        return ([rows[i] for i in calib_idx], [rows[i] for i in held_idx],
                {"source": "file", "rows": calib_idx, "held_out_rows": held_idx, "seed": int(ccfg.seed)})


def check_calibration_file(c, fidelity: bool, needs_answers: str | None = None) -> None:
    """``needs_answers``: who needs every row to carry an answer (e.g. "method=mbq"), or None."""
    if not c.path:
        raise ConfigError("calib=file needs calib.path=/path/to/calibration.{json,jsonl,parquet}")
    held = int(c.held_out) if fidelity else 0
    try:
        if c.held_out_path:
            check_calibration_rows(read_calibration_file(c.path), f"calib.path={c.path}", int(c.n_samples))
            check_calibration_rows(read_calibration_file(c.held_out_path), f"calib.held_out_path={c.held_out_path}",
                                   held)
        else:
            check_calibration_rows(read_calibration_file(c.path), f"calib.path={c.path}", int(c.n_samples) + held)
    except CalibrationDataError as err:
        raise ConfigError(str(err)) from None
    if needs_answers:
        rows = read_calibration_file(c.path)
        missing = [i for i, r in enumerate(rows) if not (isinstance(r, dict) and r.get("answer"))]
        if missing:
            raise ConfigError(f"{needs_answers} needs calibration answers, but calib.path={c.path} rows "
                              f"{missing[:5]} have no 'answer' field; add answers or use calib=testbed")


def check_calibration_rows(rows, source: str, need: int) -> None:
    """Rows are objects with a text 'question', an optional text 'answer', media that open; enough of them."""
    if not isinstance(rows, list):
        raise ConfigError(f"{source}: expected a list of rows (objects), got {type(rows).__name__}")
    if len(rows) < need:
        raise ConfigError(f"{source} has {len(rows)} rows; calib.n_samples + calib.held_out = {need}: "
                          "lower them or add rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"{source}: row {i} is a {type(row).__name__}, not an object with 'question'")
        if not isinstance(row.get("question"), str) or not row["question"].strip():
            raise ConfigError(f"{source}: row {i} has no text 'question' (fields: {sorted(row)})")
        if row.get("answer") is not None and not isinstance(row["answer"], str):
            raise ConfigError(f"{source}: row {i} 'answer' is a {type(row['answer']).__name__}, not text")
        for key, opener in (("image", _open_image), ("audio", _open_audio)):
            if row.get(key) is not None:
                try:
                    opener(row[key])
                except ConfigError:
                    raise
                except Exception as err:  # noqa: BLE001 - any unreadable file is reported with its row
                    raise ConfigError(f"{source}: row {i} {key}={str(row[key])!r} cannot be read as {key} "
                                      f"({type(err).__name__}: {err})") from None


def _open_image(p) -> None:
    from PIL import Image

    if Path(p).is_dir():
        raise IsADirectoryError("a folder, not an image file")
    with Image.open(p) as img:  # reads the header; the pixels are decoded at calibration time
        img.verify()


def _open_audio(p) -> None:
    import wave

    if Path(p).is_dir():
        raise IsADirectoryError("a folder, not an audio file")
    with wave.open(str(p)) as w:
        if w.getsampwidth() != 2:
            raise ValueError(f"{8 * w.getsampwidth()}-bit samples; 16-bit PCM WAV is expected")

