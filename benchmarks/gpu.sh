#!/usr/bin/env bash
# Everything that needs a GPU, in one command: the CUDA tests, then the attention and MusicGen benchmarks.
#
#     bash benchmarks/gpu.sh [OUT_DIR]        (default: $OUT when set, else ./gpu_results)
#
# For a machine that already has torch, triton, transformers, sentencepiece and safetensors but cannot download
# (the image of the lent GPU machines has them): the package is installed in place without its dependencies and
# without build isolation. Each step's output is also written to OUT_DIR, so what ran before a failure or a
# timeout is kept. The figures go into benchmarks/RESULTS.md by hand, with the machine, the date and this command.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/machine.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)" 2>&1 | tee -a "$out/machine.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee "$out/install.log"

status=0
step() {  # step NAME COMMAND...: run it, keep its log, remember a failure and go on with the next step
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name failed ($rc)"; status=1; }
}
# The Triton kernels and the CUDA-graph decode step against their references (compiled, fp32 / fp16 / bf16).
step cuda_tests python3 -m pytest -q -p no:cacheprovider -m cuda tests/kernels tests/unit/test_generate.py
# Our kernels against eager and compiled SDPA on MusicGen's shapes.
step attention python3 benchmarks/attention.py
# small / medium / large, batch 1 and 8, bf16: transformers eager, ours eager, ours with cuda_graph=True.
step musicgen python3 benchmarks/musicgen.py --device cuda
exit $status
