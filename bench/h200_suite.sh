#!/usr/bin/env bash
# The whole test suite on a real GPU, on each engine named (default: dawn deno), from the repo root on
# the lent H200 after `source .gpu/setup.sh`. A GPU compiles in milliseconds what the software adapter
# takes minutes over, so this is where every file runs on Dawn (CI runs Dawn's subset: README, Tests).
#   bash bench/h200_suite.sh [dawn] [deno]
set -uo pipefail
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp}" NO_COLOR=1
status=0
for engine in "${@:-dawn deno}"; do
  for e in $engine; do
    start=$(date +%s)
    if [ "$e" = dawn ]; then
      WGATTN_WEBGPU=dawn WGATTN_DAWN_MODULE="${WGATTN_DAWN_MODULE:-$PWD/.gpu/webgpu/index.js}" \
        deno test --allow-env --allow-read --allow-run --allow-ffi tests/ 2>&1 | grep -v -E '^\s*$' | tail -n 60 || status=1
    else
      deno test --allow-env --allow-read --allow-run --allow-ffi tests/ 2>&1 | grep -v -E '^\s*$' | tail -n 60 || status=1
    fi
    echo "suite on $e: $(($(date +%s) - start)) s"
  done
done
exit $status
