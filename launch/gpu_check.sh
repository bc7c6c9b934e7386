#!/usr/bin/env bash
# Check the CUDA path on a machine with one GPU and no network, in one command (README, "Checking a
# GPU machine"):
#   make gpu-wheels                       # where the package index is reachable: writes .whl/
#   bash launch/gpu_check.sh [OUT_DIR]    # on the GPU machine, the checkout with .whl/ beside it
# The machine is expected to hold torch, triton, transformers, tensorboard, einops, scikit-learn and
# pytest (launch/gpu_wheels.py); the wheels bring the rest, installed offline into a temporary folder.
# Then: GPU, driver and versions; the `cuda` test tier; the kernel and trainer benchmarks on the GPU.
# Each part has its own time limit (8 minutes in all on an H200), so a hang cannot eat the rest.
# OUT_DIR (default runs/gpu_check) gets report.md, one log per part, the benchmark JSON and a
# BENCHMARKS.md whose GPU sections are the rows to record. Exit status: 0 when every part passed.
# Without a GPU it says so in one line and exits 0.
#   bash launch/gpu_check.sh --install-only SITE   # only the offline install into SITE, checked
set -uo pipefail
OUT=${1:-}
SITE_ARG=${2:-}
# paths given relative to where the script was called from, resolved before the cd below
[ -z "$OUT" ] || [ "$OUT" = "--install-only" ] || OUT=$(realpath -m "$OUT")
[ -z "$SITE_ARG" ] || SITE_ARG=$(realpath -m "$SITE_ARG")
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}

install_wheels() {  # install_wheels SITE: every wheel, offline, into SITE; then nothing may be missing
  local site=$1
  if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "gpu_check: no wheels in $WHEELS; run 'make gpu-wheels' where the package index is reachable" >&2
    return 1
  fi
  # GPU_CHECK_PIP_TAGS: pip's --python-version/--platform options, to rehearse the install elsewhere
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    ${GPU_CHECK_PIP_TAGS:-} "$WHEELS"/*.whl || return 1
  "$PYTHON" launch/gpu_wheels.py verify "$site" "$WHEELS"
}

if [ "$OUT" = "--install-only" ]; then
  install_wheels "${SITE_ARG:?usage: launch/gpu_check.sh --install-only SITE}"
  exit $?
fi

gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')  # (grep -q could end nvidia-smi with SIGPIPE)
if [ "${gpus:-0}" -eq 0 ]; then
  echo "gpu_check: no NVIDIA GPU on this machine (nvidia-smi lists none); nothing to check"
  exit 0
fi

OUT=${OUT:-$PWD/runs/gpu_check}
mkdir -p "$OUT"
SITE=$(mktemp -d)
trap 'rm -rf "$SITE"' EXIT
REPORT=$OUT/report.md
failed=0

if ! install_wheels "$SITE" >"$OUT/install.log" 2>&1; then
  echo "gpu_check: offline install failed; see $OUT/install.log"
  tail -5 "$OUT/install.log"
  exit 1
fi
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} PYTHONUNBUFFERED=1

{
  echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo
  echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)"
  "$PYTHON" - <<'EOF'
import importlib.metadata as md
import sys

import torch

names = ["torch", "triton", "deepspeed", "transformers", "webdataset", "tensorboard", "flash-attn", "liger-kernel"]
versions = []
for name in names:
    try:
        versions.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        versions.append(f"{name} not installed")
print(f"- CUDA {torch.version.cuda}, capability {'.'.join(map(str, torch.cuda.get_device_capability()))}; "
      f"Python {sys.version.split()[0]}")
print(f"- {', '.join(versions)}")
EOF
  echo
  echo "| part | result | time | log |"
  echo "|---|---|---|---|"
} >"$REPORT"
cat "$REPORT"

part() {  # part NAME SECONDS COMMAND...: one part under its own time limit, its log, its report row
  local name=$1 limit=$2 start=$SECONDS rc status
  shift 2
  echo "gpu_check: $name (limit $limit s) ..."
  timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
  rc=$?
  status=pass
  if [ "$rc" -ne 0 ]; then
    failed=1
    status="FAIL (exit $rc$({ [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && echo ", time limit $limit s"))"
  fi
  echo "| $name | $status | $((SECONDS - start)) s | $name.log |" >>"$REPORT"
  echo "gpu_check: $name: $status in $((SECONDS - start)) s"
  [ "$rc" -eq 0 ] || tail -15 "$OUT/$name.log"
}

cp BENCHMARKS.md "$OUT/BENCHMARKS.md"
part cuda-tests 240 "$PYTHON" -m pytest tests/cuda -m cuda -q -rs -p no:cacheprovider --junitxml "$OUT/cuda-tests.xml"
part kernels-bench 90 "$PYTHON" -m kernels.bench --out "$OUT/kernels_bench.json" --markdown "$OUT/BENCHMARKS.md"
part trainer-bench 150 "$PYTHON" -m trainer.bench --config launch/configs/bench_1b.yaml --world-sizes 1 \
  --steps 10 --warmup 3 --out "$OUT/trainer_bench.json" --markdown "$OUT/BENCHMARKS.md" \
  --data "$OUT/bench_data"

echo
cat "$REPORT"
echo "gpu_check: $([ $failed -eq 0 ] && echo "every part passed" || echo "some part FAILED"); report in $REPORT"
exit $failed
