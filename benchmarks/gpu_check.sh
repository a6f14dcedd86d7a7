#!/usr/bin/env bash
# The throughput benchmark on one GPU, with one and with several batches in flight per engine.
#
#   benchmarks/gpu_check.sh                        # the Rank1-shaped workload (4,000 pairs) and its model
#   benchmarks/gpu_check.sh MODEL [OPTION...]      # a real Rank1 model, e.g. jhu-clsp/rank1-7b, on DL19's
#                                                  # BM25 top 20 at the reference's budget
#
# Needs one NVIDIA GPU and the GPU build (make setup BUILD=gpu). OPTIONs go to
# benchmarks/throughput.py and win over the ones set here: --input DIR or --rankllm FILE for other
# pairs, --top, --budget, --max-concurrent-batches N for (a), --repeat 3.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python

fail() {
    echo "gpu_check: FAILED: $*" >&2
    exit 1
}

[ -x "$python" ] || fail "no $python: set up first with: make setup BUILD=gpu"

# Both must see the GPU: the driver (nvidia-smi) and the torch that vLLM runs on (a CPU build's
# torch sees none even on a GPU machine).
if ! command -v nvidia-smi >/dev/null 2>&1; then
    driver="nvidia-smi not found"
elif ! gpus=$(nvidia-smi -L 2>&1) || [ -z "$gpus" ]; then
    driver="nvidia-smi lists no GPU (${gpus:-no output})"
else
    driver=""
fi
torch_view=$("$python" -c '
import torch
print("yes" if torch.cuda.is_available() else f"no (torch {torch.__version__})")' 2>&1) || torch_view="no (torch does not import: ${torch_view##*$'\n'})"
if [ -n "$driver" ] || [ "$torch_view" != "yes" ]; then
    fail "no GPU visible: ${driver:-nvidia-smi sees a GPU}; torch.cuda.is_available(): $torch_view.
This check needs one NVIDIA GPU and the GPU build of vLLM: make setup BUILD=gpu.
On a CPU machine run the CPU benchmark instead: $python benchmarks/throughput.py --workload"
fi
echo "gpu_check: $(nvidia-smi -L | head -1)"

# A GPU engine as a real run has it: compiled (not eager), vLLM's own KV-cache block size.
if [ $# -eq 0 ]; then
    exec "$python" benchmarks/throughput.py --workload --pairs 4000 --no-eager
fi
model=$1
shift
exec "$python" benchmarks/throughput.py --model "$model" --top 20 --budget 8192 --max-model-len 16000 --no-eager "$@"
