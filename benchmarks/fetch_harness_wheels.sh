#!/usr/bin/env bash
# Wheels the harness needs on the GPU machine beyond what it has (torch, transformers, peft, triton, accelerate,
# ...: /work/.library/device/KINDS.md), which has no package index: downloaded here into .whl/ (git-ignored),
# at the versions of constraints.txt, and carried with the working tree (`carry: [".whl"]`); then the peers'
# wheels (benchmarks/fetch_peer_wheels.sh). benchmarks/device_setup.sh installs them there.
#
#   bash benchmarks/fetch_harness_wheels.sh      # from anywhere inside the repository
#
#   .whl/w     hydra-core, omegaconf, trl, datasets, multiprocess, dill, bitsandbytes (CPython 3.12, manylinux)
#   .whl/site  antlr4-python3-runtime (hydra's parser runtime): PyPI has no wheel of it, so it is installed
#              here into a folder and copied as is (pure Python)
set -euo pipefail

cd "$(git -C "$(dirname "$0")" rev-parse --show-toplevel)"
PY=${PYTHON:-python3}
pin() { grep -iE "^$1==" constraints.txt | head -1; }
PACKAGES=()
for p in hydra-core omegaconf trl datasets multiprocess dill bitsandbytes; do
  v=$(pin "$p")
  [ -n "$v" ] || { echo "constraints.txt has no pin for $p" >&2; exit 1; }
  PACKAGES+=("$v")
done

mkdir -p .whl/w .whl/site
rm -f .whl/w/*.whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl/w "${PACKAGES[@]}"
"$PY" -m pip install -q --no-deps --target .whl/site "$(pin antlr4-python3-runtime)"
bash benchmarks/fetch_peer_wheels.sh
du -sh .whl
