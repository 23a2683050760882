#!/usr/bin/env bash
# The CUDA check to run on a GPU machine (e.g. one lent through the device tool): every model.placement on
# the testbed, then the testbed Table 1 sweep, with wall times to put beside the CPU times in the README.
#
#   bash benchmarks/gpu_check.sh            # after: bash scripts/setup.sh (or MASQUANT_TORCH=keep with a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
OUT=${OUT:-outputs/gpu_check}
PY=.venv/bin/python
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
for placement in device offload auto; do
  for method in smoothquant awq masquant; do
    quant=w8a8; [ "$method" = awq ] && quant=w4a16_g128
    /usr/bin/time -f "placement=$placement method=$method quant=$quant: %e s wall, %M KB peak RSS" \
      $PY -m masquant device=cuda model.placement=$placement method=$method quant=$quant eval=fidelity \
        logger=none reference=false force=true paths.output_root="$OUT/$placement"
  done
done
/usr/bin/time -f "table1_testbed on cuda: %e s wall" \
  $PY experiments/reproduce.py table1_testbed device=cuda paths.output_root="$OUT/table1"
# Serving (docs/export.md): export AWQ W4A16 and RTN W8A8 on the testbed, then TTFT and decode tokens/s of the
# dense folder and the exports through vLLM, when vllm can be imported (e.g. VLLM_PY=<its venv>/bin/python).
VLLM_PY=${VLLM_PY:-$PY}
if $VLLM_PY -c "import vllm" 2>/dev/null; then
  for spec in "method=awq quant=w4a16_g128" "method=rtn quant=w8a8 quant.int_range=full"; do
    $PY -m masquant device=cuda $spec export=compressed_tensors eval=fidelity logger=none reference=false \
      paths.output_root="$OUT/export"
  done
  dense="$OUT/testbed-vl-fp16"
  $PY benchmarks/serve_latency.py --write-testbed "$dense" --dtype float16
  $VLLM_PY benchmarks/serve_latency.py --dense "$dense" \
    --exported $(find "$OUT/export/runs" -path "*/export/model" -type d | sort)
else
  echo "vllm not importable: serving latency skipped (docs/export.md, Serving)"
fi
