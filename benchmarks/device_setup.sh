#!/usr/bin/env bash
# Source this on the lent GPU machine (repo root, `.whl` carried): installs the carried wheels into
# /tmp/site and the project itself (editable), with no package index.
#   .whl/w      hydra-core, omegaconf, trl, datasets, multiprocess, dill, bitsandbytes; .whl/peers: the peer
#               stacks' wheels; .whl/site: pure-Python packages that PyPI has no wheel for (antlr4-python3-runtime).
#               All three: `bash benchmarks/fetch_harness_wheels.sh` on this side first.
# Source it in the calling shell, never in a pipeline: `source benchmarks/device_setup.sh | tail -1` runs in a
# subshell, its exports (PYTHONPATH) are lost and `python3 -m harness` then fails with "No module named 'hydra'".
# Redirect instead: `source benchmarks/device_setup.sh > /tmp/setup.log 2>&1`.
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/w/*.whl .whl/peers/*.whl 2>&1 | tail -3
cp -r .whl/site/. /tmp/site/
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=offline
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . 2>&1 | tail -3
python3 -c "import harness.kernels, hydra, trl, bitsandbytes, torch; print('device setup ok', torch.__version__, torch.cuda.get_device_name())"
