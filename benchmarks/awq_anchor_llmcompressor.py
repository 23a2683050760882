"""The anchor of ``benchmarks/awq_speed.py``: llm-compressor's AWQ on the testbed's language model, in its own venv.

Run by ``awq_speed.py --anchor-python <venv>/bin/python`` (never imported by the project; it needs only torch,
transformers and llmcompressor). Reads the token ids that ``awq_speed.py`` wrote (the same calibration and
held-out sequences as ``calib=text`` and ``eval.ppl``), loads the plain SmolLM2 folder the testbed was converted
from (the testbed's language model's weights), runs ``oneshot`` with ``AWQModifier`` then a
``QuantizationModifier`` (int W4A16, symmetric, per group of ``--group-size``; lm_head left in float) and writes
a JSON: the CPU seconds of ``oneshot`` alone (``time.process_time``), its wall seconds, the dense and the
quantized perplexity.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402


@torch.no_grad()
def perplexity(model, seqs: torch.Tensor) -> float:
    """exp of the mean next-token NLL over all sequences (one sequence per call), as the project measures it."""
    nll, count = 0.0, 0
    for ids in seqs:
        ids = ids[None]
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False).logits[0].float()
        nll += float(torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="sum"))
        count += ids.shape[1] - 1
    return math.exp(nll / max(count, 1))


def allow_cpu_only() -> None:
    """llmcompressor 0.14 pins its cached activations before the grid search; pinning needs an accelerator in
    recent torch. Without one, leave them unpinned (pinning only speeds host-to-device copies)."""
    if torch.cuda.is_available():
        return
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, *args, **kwargs: None


def recipe(group_size: int, symmetric: bool, duo_scaling):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    weights = QuantizationArgs(num_bits=4, type="int", symmetric=symmetric, strategy="group", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=weights)
    return [AWQModifier(duo_scaling=duo_scaling),
            QuantizationModifier(config_groups={"group_0": scheme}, ignore=["lm_head"])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="folder of the plain SmolLM2 (LlamaForCausalLM)")
    p.add_argument("--ids", required=True, help="torch file {'calib': [n, L], 'held_out': [m, L]} of token ids")
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--group-size", type=int, default=64)
    p.add_argument("--asymmetric", action="store_true")
    p.add_argument("--duo-scaling", default="true", choices=("true", "false", "both"))
    p.add_argument("--no-ppl", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoTokenizer, LlamaForCausalLM

    import llmcompressor

    allow_cpu_only()
    ids = torch.load(args.ids)
    calib, held = ids["calib"], ids["held_out"]
    model = LlamaForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    dense = None if args.no_ppl else perplexity(model, held)
    data = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    duo = {"true": True, "false": False, "both": "both"}[args.duo_scaling]
    c0, w0 = time.process_time(), time.perf_counter()
    oneshot(model=model, tokenizer=tokenizer, dataset=data, recipe=recipe(args.group_size, not args.asymmetric, duo),
            num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1], shuffle_calibration_samples=False)
    cpu, wall = time.process_time() - c0, time.perf_counter() - w0
    quant = None if args.no_ppl else perplexity(model, held)
    result = {"tool": f"llmcompressor {llmcompressor.__version__}", "torch": torch.__version__,
              "threads": torch.get_num_threads(), "oneshot_cpu_s": cpu, "oneshot_wall_s": wall,
              "ppl_dense": dense, "ppl_quant": quant, "group_size": args.group_size,
              "symmetric": not args.asymmetric, "duo_scaling": args.duo_scaling, "n_calib": int(calib.shape[0])}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
