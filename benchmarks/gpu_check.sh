#!/usr/bin/env bash
# The checks of one lent-GPU session, as one short script (run from the repository root on the GPU machine).
#
# It needs, beside the working tree (none of them committed):
#   .whl/                               wheels of what the machine lacks: torch-pruning, and codecarbon with the
#                                       packages it needs (the machine has torch, numpy, typer, rich, safetensors,
#                                       scikit-learn, matplotlib, onnx and onnxruntime)
#   .devcarry/data/fashion-mnist/       the four IDX files of Fashion-MNIST
#   .devcarry/models/resnet20-bn, resnet56   trained models (runs/bench/, see BENCHMARKS.md)
# Everything it measures lands in $OUT: tests.log, quick.log, slim-*.log, gpu.txt and results.tgz (the benchmark
# JSONs and the quick study's results.json / report.md / report.html).
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CNNMOD_DATA=$PWD/.devcarry/data CNNMOD_CACHE=/tmp/cnnmod-cache CNNMOD_NO_PROGRESS=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,power.draw --format=csv > "$OUT/gpu.txt"
python3 -c "import torch, torch_pruning, codecarbon; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
start=$(date +%s)
stamp() { echo "[$(( $(date +%s) - start )) s] $*"; }

# 1. the study's quick preset on the GPU, beside the tests (so its seconds are an upper bound)
( timeout "${QUICK_S:-200}" python3 -m cnnmod reproduce --preset quick --device cuda --out /tmp/quick \
    > "$OUT/quick.log" 2>&1; echo "quick rc=$? after $(( $(date +%s) - start )) s" >> "$OUT/quick.log" ) &
quick=$!
# 2. the whole suite, the CUDA tests included
OMP_NUM_THREADS=2 timeout "${TESTS_S:-170}" python3 -m pytest -q -n 6 -p no:cacheprovider tests \
    > "$OUT/tests.log" 2>&1
stamp "tests rc=$?"; tail -4 "$OUT/tests.log"
wait $quick
stamp "quick done"; tail -2 "$OUT/quick.log"

# 3. slim modules on CUDA, alone on the machine: all ten of ResNet-20 (BN) at 0.5 (voting and merged
#    compositions against the paper's node-level voting, latency at batch 256), and the 2-class Dress + Sandal
#    composition pruned as far as 1 point of held-out top-1 allows
timeout "${SLIM_S:-260}" python3 benchmarks/slim_and_fast.py .devcarry/models/resnet20-bn --sizes 0.5 \
    --device cuda --repeats 50 --name-suffix _cuda --pair 3,5 --merge-max-loss 1 > "$OUT/slim-r20.log" 2>&1
stamp "slim resnet20-bn rc=$?"; tail -4 "$OUT/slim-r20.log"
# 4. the same pair on ResNet-56 (no BN)
timeout "${PAIR56_S:-110}" python3 benchmarks/slim_and_fast.py .devcarry/models/resnet56 --sizes 0.5 \
    --device cuda --repeats 50 --name-suffix _cuda --pair-only --pair 3,5 --merge-max-loss 1 \
    > "$OUT/slim-r56.log" 2>&1
stamp "slim resnet56 pair rc=$?"; tail -3 "$OUT/slim-r56.log"
# 5. that pair's merged composition timed again, eager and then as CUDA graphs (torch.compile "reduce-overhead"),
#    each against the model compiled the same way (COMPILE_S=0 skips it)
if [ "${COMPILE_S:-150}" -gt 0 ]; then
    timeout "${COMPILE_S:-150}" python3 benchmarks/slim_and_fast.py .devcarry/models/resnet56 --device cuda \
        --repeats 50 --name-suffix _cuda --pair-only --retime --compile > "$OUT/compile-r56.log" 2>&1
    stamp "compiled pair rc=$?"; tail -3 "$OUT/compile-r56.log"
fi

tar czf "$OUT/results.tgz" benchmarks/out/*.json /tmp/quick/results.json /tmp/quick/report.md \
    /tmp/quick/report.html /tmp/quick/parts/seconds.json 2>/dev/null
stamp "done"
