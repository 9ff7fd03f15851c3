#!/usr/bin/env bash
# The GPU rows of the benchmarks in one short run on one GPU (a machine with PyTorch + CUDA, no Ray):
#   benchmarks/bench_gpu.py   ViT-B/16 JEPA step, 224 px: fp32 / bf16 / the DeepSpeed ZeRO-2 engine,
#                             samples/s, MFU, peak memory
#   benchmarks/bench_model.py the context encoder's cost against its visible share, ViT-B bf16 on CUDA
# Results go to $OUT (default ./gpu-rows) as JSON, with the log.
#
#   benchmarks/gpu-rows.sh fetch   # on a machine with pip: the wheels the GPU machine may lack, in .whl/
#   benchmarks/gpu-rows.sh         # on the GPU machine (carry .whl/ there when it has no pip access)
#
# The rows that need Ray on the GPU machine (`jepa-ray bench train` / `bench stream` with
# train.use_gpu=true: the Ray Train ZeRO-2 run and the Ray Data stream feeding it) are not here: run
# them on a Ray cluster (docs/cluster.md).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PY=${PYTHON:-python3}

if [[ "${1:-}" == "fetch" ]]; then
  # pure-python packages and pydantic-core for CPython 3.12 on x86-64 Linux; DeepSpeed built here
  # without its compiled ops (it compiles what it needs on first use, and this step needs none)
  mkdir -p "$WHEELS"
  plat=(--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64)
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
    -d "$WHEELS" pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 hjson==3.1.0
  DS_BUILD_OPS=0 $PY -m pip wheel -q --no-deps -w "$WHEELS" deepspeed==0.19.8
  du -sh "$WHEELS"
  exit 0
fi

OUT=${OUT:-gpu-rows}
mkdir -p "$OUT"
if ! $PY -c "import pydantic, deepspeed" 2>/dev/null; then
  [[ -d "$WHEELS" ]] || { echo "pydantic or deepspeed missing and no $WHEELS/: run '$0 fetch' first" >&2; exit 2; }
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" || true
quick=()
[[ -n "${QUICK:-}" ]] && quick=(--quick)  # QUICK=1: the tiny model, a check of the script on any machine
set -o pipefail
$PY benchmarks/bench_gpu.py "${quick[@]}" --out "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu.log"
$PY benchmarks/bench_model.py "${quick[@]}" --out "$OUT/model-gpu.json" 2>&1 | tee "$OUT/model-gpu.log"
