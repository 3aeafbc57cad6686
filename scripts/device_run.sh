#!/usr/bin/env bash
# The one command for an SM90 machine: GPU test suite, first-compile time, benchmarks.
# Results go to $OUT (the device tool's folder) or ./device-results. Run from the repository root:
#   bash scripts/device_run.sh [tests|bench]     (default: both)
# With DeepGEMM's source in .deepgemm (README.md, "DeepGEMM beside moegemm"), it is built while the
# tests run and the bench times it beside moegemm.
# Each step has a time limit, so a hung kernel costs minutes, not the whole session.
set -uo pipefail
steps=${1:-all}
out=${OUT:-$PWD/device-results}
mkdir -p "$out"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
# Wheels carried to a machine without network (pytest); harmless elsewhere.
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if [ "$steps" != tests ] && [ -f .deepgemm/setup.py ]; then
  (cd .deepgemm && ln -sfn ../../third-party/cutlass/include/cute deep_gemm/include/cute \
     && ln -sfn ../../third-party/cutlass/include/cutlass deep_gemm/include/cutlass \
     && CXX=/usr/bin/g++ timeout 300 python3 setup.py build_ext --inplace >"$out/deepgemm_build.txt" 2>&1) &
fi
export MOEGEMM_CACHE_DIR=${MOEGEMM_CACHE_DIR:-/tmp/moegemm-cache}
rm -rf "$MOEGEMM_CACHE_DIR"
# The device tool's copy may carry stale git metadata: pass the commit in, COMMIT=<hash> bash ....
{ date -u; echo "commit: ${COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}"; nvidia-smi --query-gpu=name,driver_version,clocks.sm --format=csv; } | tee "$out/info.txt"
python3 -m moegemm info | tee -a "$out/info.txt"
if [ "$steps" != bench ]; then
  timeout 120 python3 scripts/first_compile.py 2>&1 | tee "$out/first_compile.txt"
  # Compiles dominate the suite: spread it over the host's cores where pytest-xdist is installed.
  parallel=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
  timeout 420 python3 -m pytest -q -rs $parallel tests 2>&1 | tee "$out/tests.txt"
fi
if [ "$steps" != tests ]; then
  wait  # for the DeepGEMM build
  [ -f .deepgemm/setup.py ] && export PYTHONPATH=$PYTHONPATH:$PWD/.deepgemm
  # One section per process and time limit: a slow or broken section cannot take the other with it.
  for section in ${BENCH_SECTIONS:-fp8 bf16 fp4 moe mqa}; do
    timeout 300 python3 -m moegemm bench --only $section --json "$out/bench_$section.json" 2>&1 \
      | tee "$out/bench_$section.txt"
  done
fi
