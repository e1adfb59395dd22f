#!/usr/bin/env bash
# The GPU checks of one short device session, in order of value; logs and tables go to $OUT (or $1).
#   bash benchmarks/gpu_check.sh [OUT_DIR]        (PARTS="profile cli bench tests" picks and orders them)
# profile: where one trainer step's time goes (host / wall / kernel ms, the profiler's top operators);
# cli: a real CLI run of configs/cifar10_40.yaml (WRN-28-2, batch 64+448+448) on CIFAR-10 files generated
#   in the real on-disk format (nothing can be downloaded there), with the defaults (data on the GPU,
#   augmentation as a CUDA graph, bf16 autocast, channels_last, compile reduce-overhead); EXTRA_RUNS=1
#   adds runs without the augmentation graph, with loader workers, and without compile;
# bench: the benchmark table (sections 4 and 4b); tests: the CUDA tests.
# Missing packages (pytorch-ignite) travel as wheels in .whl/ (see README, Performance).
set -u
OUT=${1:-${OUT:-/tmp/gpu_check}}
ITERS=${ITERS:-2000}
PARTS=${PARTS:-profile cli bench tests}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/machine.txt"
python3 -c "import torch, torchvision, ignite; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'ignite', ignite.__version__, 'cpus', __import__('os').cpu_count())" | tee -a "$OUT/machine.txt"

HANDLERS="handlers=[{name: ema}, {name: cosine_lr}, {name: terminate_on_nan}, {name: evaluation, params: {every: 1000}}, {name: checkpoint, params: {every: 1000, keep: 2}}, {name: tensorboard, params: {every: 50}}, {name: progress, params: {every: 250, mode: log}}]"
run() {
  local name=$1 iters=$2; shift 2
  timeout "${RUN_TIMEOUT:-170}" python3 -m ignite_fixmatch.main configs/cifar10_40.yaml data.root=/tmp/data data.download=false \
    output_dir="/tmp/runs/$name" train.num_iters="$iters" "$HANDLERS" "$@" >"$OUT/cli_$name.log" 2>&1
  echo "$name: exit $?"
  grep -E "Speed settings|iteration [0-9]+/|Evaluation at|Error|error|warn" "$OUT/cli_$name.log" | tail -n 20
}

for part in $PARTS; do
  echo "== $part"
  case $part in
    profile)
      timeout "${PROFILE_TIMEOUT:-150}" python3 -m benchmarks.profile_step --device cuda --compile-mode "${PROFILE_MODE:-reduce-overhead}" 2>&1 \
        | grep -v "^USDT\|^ERROR:.*DeviceProperties" | tee "$OUT/profile.txt" | head -n 60 ;;
    cli)
      [ -d /tmp/data ] || python3 -c "import sys; sys.path.insert(0, 'tests'); import datagen; datagen.make_cifar10('/tmp/data', n_train=50000, n_test=10000)"
      run defaults "$ITERS"
      if [ -n "${EXTRA_RUNS:-}" ]; then
        run no_graph 1000 data.cuda_graph=off
        run loaders 1500 data.augment=batched data.num_workers=10
        run eager 1000 model.compile=off
      fi ;;
    bench)
      timeout "${BENCH_TIMEOUT:-170}" python3 -m benchmarks.run --device cuda --skip "${BENCH_SKIP:-aug,model,overhead}" --rounds 2 --json "$OUT/bench.json" 2>"$OUT/bench.err" | tee "$OUT/bench.txt"
      tail -n 5 "$OUT/bench.err" ;;
    tests)
      timeout "${TESTS_TIMEOUT:-150}" python3 -m pytest -q -p no:cacheprovider tests/test_device_data.py tests/test_augment_batched.py tests/test_cuda_graph.py -k "cuda or graph" 2>&1 | tail -n 15 | tee "$OUT/tests.txt" ;;
  esac
done
