#!/usr/bin/env bash
# A/B of two builds on an SM90 machine: scripts/ab_fp8_gemm.py over this checkout ("new") and the
# checkout in $BASE ("old", default .ab-base: e.g. `git archive <commit> moegemm | tar -x -C .ab-base`),
# alternately, two rounds of each flag set given (default: "" and --small, i.e. the dense + grouped
# GEMMs and casts, then the small-M GEMMs). Lines go to $OUT/ab.txt (or ./device-results).
set -uo pipefail
out=${OUT:-$PWD/device-results}
base=${BASE:-.ab-base}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
[ $# -gt 0 ] || set -- "" "--small"
for flags in "$@"; do
  for round in 1 2; do
    for tree in new old; do
      path=$([ "$tree" = new ] && echo "$PWD" || echo "$base")
      PYTHONPATH=$path MOEGEMM_CACHE_DIR=/tmp/ab-cache-$tree timeout 200 python3 scripts/ab_fp8_gemm.py "$tree" $flags
    done
  done
done 2>&1 | tee "$out/ab.txt"
