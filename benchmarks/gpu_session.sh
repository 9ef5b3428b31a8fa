#!/usr/bin/env bash
# The measurements a GPU call owes the open issues, in parts that each fit the device tool's 10-minute limit.
# On the lent machine, repo root, `.whl` carried:
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_session.sh tests      # ~4 min
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_session.sh trainer    # ~2 min: loop vs Trainer
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_session.sh peers      # ~8 min: the six stacks
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_session.sh unsloth    # ~5 min: Unsloth vs loop + Trainer
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_session.sh profile    # ~1.5 min: harness16's step, by kernel family
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_session.sh tprofile   # ~2 min: the same through the Trainer
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_session.sh longest    # longest sequence at batch 1
#   AB="; --no-lora-op" ROUNDS=2 bash benchmarks/gpu_session.sh ab    # harness16 variants, one process each (here: kernels.lora_op off)
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_session.sh paths      # ~7 min: kernels.lora_paths tests, sweep, A/B
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_session.sh dytune     # ~2 min: the fused dy pass's launch sweep
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_session.sh tune       # RMSNorm bwd / RoPE launch sweeps
#   source benchmarks/device_setup.sh && bash benchmarks/gpu_session.sh kernels    # kernel microbenchmarks
# Everything it prints is also written under $OUT (or ./gpu_out), one file per part.
set -uo pipefail
part=${1:-tests}
out=${OUT:-gpu_out}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"
case "$part" in
  tests)  # GPU tests: kernels at real shapes, graphs vs eager, the 4-bit run with the CUDA defaults (no -x: one failure must not hide the rest)
    python3 -m pytest -q -m gpu tests/test_gpu.py tests/kernels -s 2>&1 | tee "$out/tests.txt" ;;
  trainer)  # the bench's loop and the harness's training loop, same model and batch, one process each
    for s in harness16 harness4; do
      python3 -m harness.bench --stack "$s" 2>&1 | tail -1
      python3 -m harness.bench --stack "$s" --trainer 2>&1 | tail -1
    done | tee "$out/trainer.jsonl" ;;
  peers)  # the anchor table, six stacks, each in its own process (Unsloth compiles on a cold cache: ~450 s in all)
    python3 -m harness mode=bench logger=none bench.timeout_s=300 hydra.run.dir="$out/bench" 2>&1 \
      | tee "$out/peers.txt" ;;
  unsloth)  # Unsloth beside the harness, its loop and its Trainer (TRAINER=false: loop only), in one table (STACKS to choose; a cold
    # Unsloth compile cache takes ~150 s; EXTRA: more overrides, e.g. EXTRA="bench.batch=2 bench.tokens=2048" for
    # another shape). The run dir stays in /tmp; its table and rows are copied to $out.
    # shellcheck disable=SC2086  # EXTRA is a list of overrides
    python3 -m harness mode=bench logger=none "bench.stacks=${STACKS:-[unsloth16,unsloth4,harness16,harness4]}" \
      bench.trainer="${TRAINER:-true}" bench.timeout_s="${STACK_TIMEOUT:-220}" ${EXTRA:-} hydra.run.dir=/tmp/bench_unsloth 2>&1 \
      | tee "$out/unsloth.txt"
    cp /tmp/bench_unsloth/bench.md /tmp/bench_unsloth/bench.jsonl "$out/" 2>/dev/null ;;
  profile)  # where harness16's step goes: phases, host syncs, GPU time per kernel family, top kernels
    python3 -m harness.bench --stack harness16 --profile 2>&1 | tee "$out/profile.txt" ;;
  tprofile)  # where harness16's step goes through the Trainer (the loop a `harness` run uses): set beside `profile`
    python3 -m harness.bench --stack harness16 --trainer --profile 2>&1 | tee "$out/tprofile.txt" ;;
  longest)  # longest sequence at batch 1, an 80 GB card's memory on any card so H100 and H200 calls compare;
    # one process per stack, searched from 16,384 tokens to GRANULARITY tokens (STACK_TIMEOUT s each)
    for s in ${LONGEST_STACKS:-hf16 unsloth16 harness16}; do
      timeout "${STACK_TIMEOUT:-150}" python3 -m harness.bench --stack "$s" --longest --memory-gib 80 \
        --tokens 16384 --max-tokens 131072 --granularity "${GRANULARITY:-2048}" > "/tmp/longest_$s.txt" 2>&1
      echo "$s exit $?"; grep -E " tokens: (fits|out of memory)|^\{" "/tmp/longest_$s.txt"  # probes so far, then the row
    done | tee -a "$out/longest.txt" ;;  # (appends: one call may run it per stack, each with its own STACK_TIMEOUT)
  ab)  # harness16 A/B, one process per variant: AB holds ';'-separated bench argument lists ('' = as shipped),
    # run ROUNDS times interleaved; each prints its JSON row (STACK_TIMEOUT s each)
    IFS=';' read -ra variants <<< "${AB:-;--inductor combo_kernels=true}"
    for round in $(seq "${ROUNDS:-1}"); do
      for v in "${variants[@]}"; do
        echo "## round $round: harness16 $v"
        # shellcheck disable=SC2086  # a variant is a list of arguments
        timeout "${STACK_TIMEOUT:-150}" python3 -m harness.bench --stack harness16 $v 2>&1 | tail -1
      done
    done | tee "$out/ab.txt" ;;
  paths)  # kernels.lora_paths: GPU tests of the Triton LoRA paths, their kernel sweep (y/dx/dA/dB checked; ITERS calls per
    # profiler measurement), the grouped gate/up and q/k/v beside them, then the
    # anchor A/B auto vs cublas, ROUNDS rounds alternating the order, whole JSON rows (loss included) kept
    python3 -m pytest -q -m gpu tests/kernels/test_lora_linear.py tests/kernels/test_lora_op.py \
      tests/kernels/test_tiled_mlp.py 2>&1 | tail -15 | tee "$out/paths_tests.txt"
    HARNESS_LORA_PATHS=auto timeout "${WHOLE_TIMEOUT:-150}" python3 -m pytest -q -m gpu tests/test_gpu.py \
      -k whole_model -s 2>&1 | grep -E "loss|passed|failed|Error" | tee "$out/paths_whole_model.txt"  # loss + LoRA grads, kernels vs reference
    timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/kernels_bench.py --quick --only lora --lora-paths --iters "${ITERS:-10}" --out "$out" \
      > "$out/paths_kernels.txt" 2>&1; grep -E "check|lora_linear paths e.*/e.*/f|lora_linear paths cublas/cublas/cublas" \
      "$out/paths_kernels.txt"
    for round in $(seq "${ROUNDS:-2}"); do
      order="auto cublas"; [ $((round % 2)) = 0 ] && order="cublas auto"
      for v in $order; do
        echo "## round $round: --lora-paths $v"
        timeout "${STACK_TIMEOUT:-90}" python3 -m harness.bench --stack harness16 --lora-paths "$v" 2>&1 | tail -1
      done
    done | tee "$out/paths_ab.txt" ;;
  dytune)  # the fused dy pass's launch sweep (DY_LAUNCH) at the LoRA shapes
    timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/kernels_bench.py --only lora --tune-dy --tune-only 2>&1 \
      | tee "$out/dytune.txt" | grep -E "tune dy|device|copy" ;;
  tune)  # RMSNorm backward / RoPE launch-shape sweeps only
    python3 benchmarks/kernels_bench.py --tune-only 2>&1 | tee "$out/tune.txt" ;;
  kernels)
    python3 benchmarks/kernels_bench.py --quick --out "$out" 2>&1 | tee "$out/kernels.txt" ;;
  *)
    echo "usage: bash benchmarks/gpu_session.sh tests|trainer|peers|unsloth|profile|tprofile|ab|longest|paths|dytune|tune|kernels" >&2; exit 2 ;;
esac
