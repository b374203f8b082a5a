#!/usr/bin/env bash
# Everything that needs a GPU, in one command: the CUDA tests, then the diffusion and MusicGen benchmarks.
#
#     bash benchmarks/gpu.sh [OUT_DIR]        (default: $OUT when set, else ./gpu_results)
#
# For a machine that already has torch, triton, transformers, sentencepiece and safetensors but cannot download
# (the image of the lent GPU machines has them): the package is installed in place without its dependencies and
# without build isolation, and wheels found in .whl/ (diffusers and its importlib_metadata, which that image lacks:
# `pip download --no-deps -d .whl diffusers==0.42.1 importlib_metadata==8.7.0`; importlib_metadata 10 needs
# lazy-importer too) go to /tmp/site first. Each step's output is also written to OUT_DIR, so what ran before a
# failure or a timeout is kept; each step has its own time limit, cut to what is left of GPU_DEADLINE seconds
# (default 510) for the whole script, so the last steps shrink rather than the whole run being lost. The steps run
# most important first. The figures go into benchmarks/RESULTS.md by hand, with the machine, the date and this
# command.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
begin=$(date +%s)
deadline=${GPU_DEADLINE:-510}
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$out/machine.txt"
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, \
'transformers', transformers.__version__)" 2>&1 | tee -a "$out/machine.txt"
python3 -m pip install -q --no-deps --no-build-isolation -e . 2>&1 | tail -3 | tee "$out/install.log"

status=0
step() {  # step NAME SECONDS COMMAND...: run it (at most SECONDS, or what is left), keep its log, go on after a failure
    local name=$1 limit=$2
    shift 2
    local left=$(( deadline - ($(date +%s) - begin) ))
    (( left < limit )) && limit=$left
    if (( limit < 10 )); then echo "== $name skipped: no time left"; status=1; return; fi
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name failed ($rc; 124 = out of time)"; status=1; }
}
# The Triton kernels (MusicGen's and the UNets' shapes), the CUDA-graph decode step and the pipelines' CUDA-graph
# UNet call against their references (compiled, fp32 / fp16 / bf16).
step cuda_tests 170 python3 -m pytest -q -p no:cacheprovider -m cuda tests/kernels tests/unit/test_generate.py \
    tests/unit/test_ldm.py
# A 10.24 s clip end to end, reference and ours in fp32 and bf16, ours with the CUDA-graph UNet call.
step ldm_musicldm 100 python3 benchmarks/ldm.py --device cuda --model musicldm
# One UNet step: diffusers and ours, fp32 / bf16 / torch SDPA / CUDA graph.
step unet 100 python3 benchmarks/unet.py --device cuda
step ldm_audioldm2 130 python3 benchmarks/ldm.py --device cuda --model audioldm2
# Our kernels against eager and compiled SDPA on MusicGen's shapes.
step attention 45 python3 benchmarks/attention.py
# small / medium / large, batch 1 and 8, bf16: transformers eager, ours eager, ours with cuda_graph=True.
step musicgen 300 python3 benchmarks/musicgen.py --device cuda
echo "== done in $(( $(date +%s) - begin )) s"
exit $status
