"""One export: deployable variant -> checkpoint folder (+ LoRA adapters) -> reload -> logits and gap -> export.json.

Called by the pipeline after a run's evaluation (``export=compressed_tensors``) with the in-memory model, which
it turns into its deployable variant in place. The reload is the proof: the folder is loaded by transformers with
compressed-tensors, as a user's fresh process would, and its logits on the held-out prompts must equal the
in-memory deployable model's (max |Δ| / max |logit| ≤ ``export.max_rel_diff``), else the export fails. The gap of
the deployable variant (what the format cannot hold: per-modality paths, re-rounded weights) is measured as the
exported model's SQNR and perplexity beside the in-memory run's.
"""

from __future__ import annotations

import gc
import json
import logging
import time
from pathlib import Path

import torch

from masquant.errors import ConfigError
from masquant.adapters.checkpoint import load_checkpoint
from masquant.export.compressed_tensors import write_folder
from masquant.export.deployable import make_deployable_, quant_linears
from masquant.export.lora import write_adapters

log = logging.getLogger(__name__)

EXPORT_FILE = "export.json"


class ExportMismatch(RuntimeError):
    """The reloaded checkpoint does not compute the in-memory model's logits."""


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def fp16_mb(model) -> float:
    """What the architecture's weights take in 16 bits (the FP16 checkpoint's size, without tied copies)."""
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() in seen or not torch.is_floating_point(p):
            continue
        seen.add(p.data_ptr())
        total += p.numel() * 2
    return total / 2**20


@torch.no_grad()
def batch_logits(model, batches, device) -> list[torch.Tensor]:
    out = []
    for b in batches:
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in b.items()}
        out.append(model(**inputs, use_cache=False).logits.float().cpu())
    return out


def compare(reference: list[torch.Tensor], other: list[torch.Tensor]) -> dict:
    """max |Δ| of two lists of logits, and relative to the largest reference logit (non-finite values: inf)."""
    diff = max(float(torch.nan_to_num((a - b).abs(), nan=float("inf")).max()) for a, b in zip(reference, other))
    scale = max(float(a.abs().max()) for a in reference)
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale else diff,
            "tokens": sum(a.shape[-2] for a in reference)}


def e2e(metrics: dict, prefix: str = "fidelity/sqnr/") -> dict:
    return {k[len(prefix):-len("/e2e")]: v for k, v in metrics.items() if k.startswith(prefix) and k.endswith("/e2e")}


def cast_keeping_grids_(model, dtype: torch.dtype) -> None:
    """The model's parameters in ``dtype``, as ``from_pretrained(dtype=...)`` would load them (buffers computed at
    init, such as rotary frequencies, stay as they are; the linears' grids stay float32): the deployable variant in the
    checkpoint's dtype, its weights (codes · scale).to(dtype), what the format's dequantization gives."""
    with torch.no_grad():
        for p in model.parameters():
            if torch.is_floating_point(p):
                p.data = p.data.to(dtype)


def measure(model, adapter, batches, device, ref, ppl_ids, desc: str) -> dict:
    """End-to-end SQNR per modality (against the FP reference) and perplexity of ``model``."""
    from masquant.evaluation.fidelity import sqnr_report
    from masquant.evaluation.text_corpus import sequences_perplexity

    out = {}
    if ref is not None and batches:
        out.update(sqnr_report(model, adapter, batches, device, ref))
    if ppl_ids is not None:
        out["fidelity/ppl"] = sequences_perplexity(model, ppl_ids, device, f"perplexity ({desc})")
    return out


def reload_and_compare(model, model_dir: Path, batches, device, options, exact: bool) -> tuple[dict, object]:
    """Load the folder as a user would; its logits on ``batches`` against ``model``'s: (comparison, loaded model).
    Above ``export.max_rel_diff`` the export fails, unless ``exact`` is False (then it is recorded and warned)."""
    reference = batch_logits(model, batches, device) if batches else []
    loaded = load_checkpoint(type(model), model_dir, next(model.parameters()).dtype).to(device).eval()
    check = compare(reference, batch_logits(loaded, batches, device)) if batches else {}
    if check:
        check["required_equal"] = exact
    if check and check["max_rel_diff"] > options.max_rel_diff:
        if not exact:
            log.warning("export: activations quantized in the export's dtype: the reload differs from the cast "
                        "in-memory model by %.3g of the largest logit (recorded in export.json)",
                        check["max_rel_diff"])
        else:
            raise ExportMismatch(
                f"export: the reloaded checkpoint's logits differ from the in-memory model's by "
                f"{check['max_rel_diff']:.3g} of the largest logit (max |Δ| {check['max_abs_diff']:.3g} over "
                f"{check['tokens']} tokens; export.max_rel_diff={options.max_rel_diff})")
    return check, loaded


def gap_metrics(in_memory: dict, exported: dict) -> dict:
    """``export/*`` metrics: the exported model's SQNR and perplexity and their gap to the in-memory run's."""
    metrics = {}
    before = e2e(in_memory)
    for m, v in e2e(exported).items():
        metrics[f"export/sqnr/{m}/e2e"] = v
        if m in before:
            metrics[f"export/sqnr_gap/{m}"] = before[m] - v
    if exported.get("fidelity/ppl") is not None:
        metrics["export/ppl"] = exported["fidelity/ppl"]
        if in_memory.get("fidelity/ppl") is not None:
            metrics["export/ppl_gap"] = exported["fidelity/ppl"] - in_memory["fidelity/ppl"]
    return metrics


def export_model(model, adapter, processor, dest: Path, options, batches, device, ref=None, ppl_ids=None,
                 in_memory: dict | None = None) -> dict:
    """Export ``model`` (quantized in memory; changed in place) into ``dest``; returns the ``export/*`` metrics."""
    in_memory = in_memory or {}
    t0 = time.perf_counter()
    report = make_deployable_(model, adapter, str(getattr(options.unfoldable_smoothing, "value",
                                                          options.unfoldable_smoothing)))
    dtype = getattr(options, "dtype", None)
    if dtype is not None:
        cast_keeping_grids_(model, getattr(torch, str(getattr(dtype, "value", dtype))))
    changed = bool(report.dropped_paths or report.rerounded or dtype is not None)
    deployable = measure(model, adapter, batches, device, ref, ppl_ids, "deployable") if changed else {}
    model_dir = dest / "model"
    schemes = {m.scheme for m in quant_linears(model).values()}
    record: dict = {"format": "compressed-tensors",
                    "schemes": [{"name": s.name, "tag": s.tag, "grid": s.grid, "int_range": s.int_range.value}
                                for s in sorted(schemes, key=lambda s: s.name)],
                    "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
                    "deployable": report.as_dict(),
                    "quantization_config": write_folder(model, processor, model_dir)}
    if report.branches and options.lora:
        record["lora"] = write_adapters(report.branches, report.input_smoothing, dest)
    record.update(size_mb=folder_mb(model_dir), fp16_mb=fp16_mb(model),
                  files=sorted(str(f.relative_to(dest)) for f in dest.rglob("*") if f.is_file()))
    metrics = {"export/size_mb": record["size_mb"], "export/fp16_mb": record["fp16_mb"]}
    if options.verify:
        exact = dtype is None or not any(m.scheme.quantize_acts for m in quant_linears(model).values())
        check, loaded = reload_and_compare(model, model_dir, batches, device, options, exact)
        try:
            from masquant.adapters.registry import get_adapter

            exported = measure(loaded, get_adapter(loaded), batches, device, ref, ppl_ids, "export")
        finally:
            del loaded
            gc.collect()
        record["reload"] = check
        if check:
            metrics["export/max_rel_diff"] = check["max_rel_diff"]
        record["gap"] = {
            "in_memory": {"sqnr_e2e_db": e2e(in_memory), "ppl": in_memory.get("fidelity/ppl")},
            "deployable_in_memory": ({"sqnr_e2e_db": e2e(deployable), "ppl": deployable.get("fidelity/ppl")}
                                     if changed else "identical to in_memory"),
            "exported": {"sqnr_e2e_db": e2e(exported), "ppl": exported.get("fidelity/ppl")}}
        metrics.update(gap_metrics(in_memory, exported))
    record["seconds"] = time.perf_counter() - t0
    (dest / EXPORT_FILE).write_text(json.dumps(record, indent=2, default=str))
    log.info("export: %s (%.1f MB; FP16 %.1f MB)", model_dir, record["size_mb"], record["fp16_mb"])
    return metrics


def check_export_options(cfg) -> None:
    """What can be refused before a model loads."""
    fmt = str(getattr(cfg.export.format, "value", cfg.export.format))
    if fmt == "none":
        return
    from masquant.export.compressed_tensors import activation_args
    from masquant.quant.scheme import QuantScheme
    from masquant.runs.hashing import to_plain

    scheme = QuantScheme(**to_plain(cfg.quant))
    if not scheme.quantize_weights:
        raise ConfigError(f"export=compressed_tensors with quant={cfg.quant.name}: the weights are not quantized; "
                          "there is nothing to compress (the FP model is the model.path checkpoint)")
    activation_args(scheme, f" quant={cfg.quant.name}")
    if not 0 < float(cfg.export.max_rel_diff) < 1:
        raise ConfigError(f"export.max_rel_diff={cfg.export.max_rel_diff}: must be in (0, 1)")
