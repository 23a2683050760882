"""Golden results: every method x scheme on the tiny models, run through the CLI, stored or compared.

A refactoring must not move a number. ``--write`` runs every case of ``CASES`` (one ``python -m masquant``
process each, 1 thread, a fresh statistics cache) and stores, per case, the config hash and every metric that
is not a time, a memory figure or provenance (or the first line of the error, for a refused configuration) in
``tests/golden/method_results.json``. Without ``--write`` it runs them again and prints every difference.
The suite re-checks the config hashes (``tests/pipeline/test_golden_results.py``, seconds) and a handful of the
runs; ``pytest -m slow`` re-runs them all.

    python scripts/golden_results.py --write          # store (the commit before a change)
    python scripts/golden_results.py                  # compare (after it): exit 1 on any difference
    python scripts/golden_results.py --only awq-w4a16_g128 --jobs 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden" / "method_results.json"
BASE = ["model=tiny_qwen25vl", "calib=tiny", "eval=fidelity", "calib.n_samples=2", "calib.held_out=1",
        "eval.ppl_sequences=4", "logger=none", "threads=1", "device=cpu", "reference=false"]
OMNI = ["model=tiny_qwen25omni", "modality=text_vision_audio"]
STATIC = ["quant.a_dynamic=false", "quant.a_granularity=tensor"]
GPTQ = ["quant.w_quantizer=gptq"]
SCHEMES = ("w8a8", "w4a8", "w4a16_g128")

# name -> overrides (after BASE)
CASES: dict[str, list[str]] = {"dense-fp16": ["method=dense", "quant=fp16"]}
for _q in SCHEMES:
    for _m in ("rtn", "smoothquant", "awq", "mbq", "quarot", "masquant", "larosa"):
        CASES[f"{_m}-{_q}"] = [f"method={_m}", f"quant={_q}"]
    CASES[f"mquant-{_q}"] = ["method=mquant", f"quant={_q}", *STATIC]
CASES.update({
    "rtn-gptq-w4a8": ["method=rtn", "quant=w4a8", *GPTQ],
    "rtn-gptq-w4a16_g128": ["method=rtn", "quant=w4a16_g128", *GPTQ],
    "rtn-mseclip-w4a8": ["method=rtn", "quant=w4a8", "quant.w_mse_clip=true"],
    "rtn-gptq-actorder-w4a16_g128": ["method=rtn", "quant=w4a16_g128", *GPTQ, "quant.gptq_act_order=true"],
    "smoothquant-static-w8a8": ["method=smoothquant", "quant=w8a8", *STATIC],
    "smoothquant-grid-w4a8": ["method=smoothquant", "quant=w4a8", "method.alpha_grid=[0.3,0.6,0.9]"],
    "smoothquant-range-w4a8": ["method=smoothquant", "quant=w4a8", "method.act_statistic=range"],
    "awq-noclip-w4a16_g128": ["method=awq", "quant=w4a16_g128", "method.clip=false"],
    "awq-g64-w3a16": ["method=awq", "quant=w3a16_g128", "quant.w_group_size=64"],
    "mbq-uniform-mse-w4a8": ["method=mbq", "quant=w4a8", "method.uniform_weights=true", "method.loss=mse"],
    "quarot-gptq-w4a8": ["method=quarot", "quant=w4a8", *GPTQ],
    "quarot-kv4-w4a8": ["method=quarot", "quant=w4a8", "method.kv_bits=4"],
    "quarot-block-w4a4": ["method=quarot", "quant=w4a4", "method.rotation_mode=block"],
    "mquant-gptq-w4a8": ["method=mquant", "quant=w4a8", *STATIC, *GPTQ],
    "mquant-nomsq-w4a8": ["method=mquant", "quant=w4a8", *STATIC, "method.msq=false", "method.aifs=false"],
    "mquant-vision-w4a8": ["method=mquant", "quant=w4a8", *STATIC, "method.quantize_vision=true"],
    "mquant-vision-gptq-w4a8": ["method=mquant", "quant=w4a8", *STATIC, *GPTQ, "method.quantize_vision=true"],
    "masquant-pmw-w4a8": ["method=masquant", "quant=w4a8", "method.deploy=per_modality_weights"],
    "masquant-nolearn-w4a6": ["method=masquant", "quant=w4a6", "method.learn=false"],
    "masquant-tied-uniform-w4a8": ["method=masquant", "quant=w4a8", "method.tie_scales=true", "method.uniform=true"],
    "larosa-fp16": ["method=larosa", "quant=fp16"],
    "larosa-norotate-w4a8": ["method=larosa", "quant=w4a8", "method.rotate=false"],
    "larosa-gptq-w4a8": ["method=larosa", "quant=w4a8", *GPTQ],
    "omni-dense-fp16": [*OMNI, "method=dense", "quant=fp16"],
    "omni-rtn-w4a8": [*OMNI, "method=rtn", "quant=w4a8"],
    "omni-smoothquant-w8a8": [*OMNI, "method=smoothquant", "quant=w8a8"],
    "omni-masquant-w4a8": [*OMNI, "method=masquant", "quant=w4a8"],
    "omni-mquant-w4a8": [*OMNI, "method=mquant", "quant=w4a8", *STATIC],
    "omni-quarot-gptq-w4a8": [*OMNI, "method=quarot", "quant=w4a8", *GPTQ],
    "omni-awq-w4a16_g128": [*OMNI, "method=awq", "quant=w4a16_g128"],
    "omni-larosa-w8a8": [*OMNI, "method=larosa", "quant=w8a8"],
})
# keys renamed by a later change, old prefix -> new prefix (the value must still be equal)
RENAMED = {"gptq/gptq_loss/": "rtn/gptq_loss/"}  # plain GPTQ's report is under its method id, as every method's
# measurements of the machine, not of the method: never compared
VOLATILE_PREFIXES = ("time/", "memory/", "provenance/", "mem/")
VOLATILE_PARTS = ("/time_s", "_time_s/", "_s_per_layer", "_s_total", "gptq_s", "/time/")


def volatile(key: str) -> bool:
    return key.startswith(VOLATILE_PREFIXES) or any(p in key for p in VOLATILE_PARTS) or key.endswith("_s")


def run_case(name: str, overrides: list[str], python: str) -> dict:
    with tempfile.TemporaryDirectory(prefix=f"golden-{name}-") as tmp:
        cmd = [python, "-m", "masquant", *BASE, *overrides, f"paths.output_root={tmp}/out",
               f"paths.cache_dir={tmp}/cache"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
        found = sorted(Path(tmp, "out", "runs").glob("*/*/*/metrics.json"))
        if proc.returncode != 0 or not found:
            out = (proc.stderr + proc.stdout).splitlines()
            lines = [ln for ln in out if "configuration error" in ln]
            if lines:
                return {"error": lines[-1].split("configuration error: ", 1)[-1]}
            crash = [ln for ln in out if ln and not ln.startswith((" ", "Set the environment"))]
            return {"error": f"crashed (exit {proc.returncode}): {crash[-1] if crash else '?'}"}
        metrics = json.loads(found[-1].read_text())
    kept = {k: v for k, v in metrics.items() if not volatile(k)}
    return {"config_hash": metrics.get("run/config_hash"), "metrics": kept}


def same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def differences(old: dict, new: dict) -> list[str]:
    """What moved: a result's numbers (a key added by the new code is not a difference), its hash, or a refusal
    that became a result (or the reverse). Refusals whose messages were reworded are the same."""
    if "error" in old or "error" in new:
        if "error" in old and "error" in new:
            return []
        return [f"{old.get('error', 'a result')!r} -> {new.get('error', 'a result')!r}"]
    out = []
    if old["config_hash"] != new["config_hash"]:
        out.append(f"config hash {old['config_hash']} -> {new['config_hash']}")
    a, b = old["metrics"], new["metrics"]
    for key in sorted(set(a) | set(b)):
        renamed = next((new + key[len(old):] for old, new in RENAMED.items() if key.startswith(old)), None)
        if key not in b and renamed in b:
            if not same(a[key], b[renamed]):
                out.append(f"{key} (now {renamed}): {a[key]!r} -> {b[renamed]!r}")
        elif key not in b:
            out.append(f"{key}: {a[key]!r} -> (missing)")
        elif key not in a:
            continue
        elif not same(a[key], b[key]):
            out.append(f"{key}: {a[key]!r} -> {b[key]!r}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help="store the results as the golden file")
    ap.add_argument("--only", nargs="*", help="case names (default: all)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--python", default=sys.executable)
    args = ap.parse_args()
    names = args.only or list(CASES)
    bad = [n for n in names if n not in CASES]
    if bad:
        ap.error(f"unknown cases {bad}; valid: {list(CASES)}")
    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(names, pool.map(lambda n: run_case(n, CASES[n], args.python), names)))
    if args.write:
        stored = json.loads(GOLDEN.read_text()) if GOLDEN.exists() and args.only else {}
        stored.update({n: {"overrides": CASES[n], **results[n]} for n in names})
        GOLDEN.parent.mkdir(parents=True, exist_ok=True)
        tmp = GOLDEN.with_suffix(".tmp")
        tmp.write_text(json.dumps(stored, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, GOLDEN)
        for n in names:
            print(f"{n}: {'refused: ' + results[n]['error'] if 'error' in results[n] else results[n]['config_hash']}")
        return 0
    golden = json.loads(GOLDEN.read_text())
    failed = 0
    for n in names:
        if n not in golden:
            print(f"{n}: not in the golden file")
            failed += 1
            continue
        diff = differences(golden[n], results[n])
        print(f"{n}: {'same' if not diff else f'{len(diff)} differences'}")
        for line in diff[:20]:
            print(f"    {line}")
        failed += bool(diff)
    print(f"{len(names) - failed} same, {failed} different")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
