#!/usr/bin/env bash
# Everything a lent GPU session measures, in one call of the device tool (about 8 minutes at most):
#   bash benchmarks/on_device.sh OUT_DIR
# Uses the machine's own python3 and packages (no install); each part has its own time limit
# so that the parts before a slow one still bring their results back.
set -u
out=${1:?usage: on_device.sh OUT_DIR}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{
  date -u; nvidia-smi -L; nproc; free -g | head -2; df -h "$PWD" /tmp; grep -E " / | /tmp " /proc/mounts
  python3 -c 'import sys, jax
from importlib.metadata import version as v
names = ["jax", "jaxlib", "orbax-checkpoint", "flax", "numpy", "tensorstore", "torch"]
print(sys.version.split()[0], *(f"{n} {v(n)}" for n in names), jax.devices())'
} 2>&1 | tee "$out/env.txt"
timeout 100 python3 -m benchmarks.device_check --out "$out" 2>&1 | tee "$out/device_check.log"
timeout 300 python3 -m benchmarks --config configs/bench/gpu.toml --out "$out/gpu" \
  --workdir "$PWD/.bench-work" 2>&1 | tee "$out/bench.log"
timeout 110 python3 -m pytest -q -n 8 -p no:cacheprovider --timeout 90 -rfE --tb=short \
  tests/test_serialization.py tests/test_reading.py tests/test_hostcopy.py \
  tests/test_handler.py tests/test_integrity.py > "$out/tests.log" 2>&1
echo "tests rc=$?"; tail -n 40 "$out/tests.log"
