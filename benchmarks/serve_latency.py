"""Serving latency of exported checkpoints beside the dense folder, through vLLM (a GPU machine; vLLM in its own venv).

    python benchmarks/serve_latency.py --dense <FP folder> --exported <run>/export/model [<run2>/export/model ...]

    python benchmarks/serve_latency.py --write-testbed DIR [--dtype float16]   # the dense testbed-vl, a folder

For each folder, one after the other in fresh processes (vLLM keeps the GPU until its process exits): time to first
token (prefill + one token, median over the prompts) and decode tokens/s ((n-1) new tokens over the time a
generation of n tokens takes beyond the first), on the same text prompts with greedy decoding; then a table with
the ratios to the dense folder. Wall time is the figure here (a GPU's kernels, not CPU work); the GPU's name, the
vLLM version and the date are printed beside it. Needs ``vllm`` importable; otherwise it says so and exits
with status 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
import time

PROMPTS = [
    "Describe what a quantized language model is in two sentences.",
    "List three uses of a vision-language model.",
    "What is the capital of France? Answer briefly.",
    "Explain post-training quantization to a student.",
]


def measure(folder: str, new_tokens: int, max_model_len: int) -> dict:
    """In this process: vLLM on ``folder``; TTFT and decode tokens/s."""
    import torch
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=folder, max_model_len=max_model_len, enforce_eager=False)
    one = SamplingParams(max_tokens=1, temperature=0.0)
    many = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(PROMPTS, many)  # warm-up (compilation, CUDA graphs)
    ttft, decode = [], []
    for prompt in PROMPTS:
        t0 = time.perf_counter()
        llm.generate([prompt], one, use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate([prompt], many, use_tqdm=False)
        t2 = time.perf_counter()
        ttft.append(t1 - t0)
        decode.append((new_tokens - 1) / max((t2 - t1) - (t1 - t0), 1e-9))
    return {"folder": folder, "ttft_ms": 1000 * statistics.median(ttft), "decode_tok_s": statistics.median(decode),
            "gpu": torch.cuda.get_device_name(0), "vllm": vllm.__version__}


def write_testbed(folder: str, dtype: str) -> None:
    """The dense testbed-vl (trained vision tower) as a checkpoint folder in ``dtype``; prints its size in MB."""
    from pathlib import Path

    import torch

    from masquant.adapters.processors import save_processor_parts
    from masquant.testbed.model import load_testbed_vl

    model, processor = load_testbed_vl(dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    save_processor_parts(processor, folder, type(processor).__name__)
    size = sum(f.stat().st_size for f in Path(folder).rglob("*") if f.is_file()) / 2**20
    print(f"{folder}: {size:.1f} MB ({dtype})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dense", help="the FP checkpoint folder")
    ap.add_argument("--exported", nargs="+", default=[], help="exported folders (<run>/export/model)")
    ap.add_argument("--write-testbed", metavar="DIR", help="write the dense testbed-vl folder and exit")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_testbed:
        write_testbed(args.write_testbed, args.dtype)
        return
    if not args.dense or not args.exported:
        ap.error("--dense and --exported are required (or --write-testbed)")
    if args.child:
        print(json.dumps(measure(args.child, args.new_tokens, args.max_model_len)))
        return
    try:
        import vllm  # noqa: F401
    except ImportError:
        sys.exit("serve_latency: vllm is not importable here (install it in its own venv on a GPU machine)")
    rows = []
    for folder in [args.dense, *args.exported]:
        out = subprocess.run([sys.executable, __file__, "--dense", args.dense, "--exported", folder,
                              "--new-tokens", str(args.new_tokens), "--max-model-len", str(args.max_model_len),
                              "--child", folder], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{datetime.datetime.now().isoformat(timespec='seconds')}, {base['gpu']}, vLLM {base['vllm']}, "
          f"{len(PROMPTS)} prompts, {args.new_tokens} new tokens, greedy")
    print("| folder | TTFT ms | × dense | decode tok/s | × dense |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['folder']} | {r['ttft_ms']:.1f} | {r['ttft_ms'] / base['ttft_ms']:.2f} | "
              f"{r['decode_tok_s']:.0f} | {r['decode_tok_s'] / base['decode_tok_s']:.2f} |")


if __name__ == "__main__":
    main()
