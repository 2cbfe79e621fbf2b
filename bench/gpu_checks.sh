#!/usr/bin/env bash
# The GPU checks the open kernel issues owe, in one device call (docs/BENCHMARKS.md says which figure goes where):
#   1. the GPU-marked tests with the real lowerings, one log per group: Triton (part tests), Mosaic GPU (part mgpu);
#   2. old main (the redesign's base, unpacked in .ab_old by the caller) against this checkout (bench/ab.py);
#   3. multi-token attention against cuDNN and torch SDPA (bench/bench_prefill.py; part prefill); the warp-specialised
#      kernels' ping-pong schedule (part pingpong: its GPU tests, then prefill and chunk with its rows and sweeps);
#   4. quantized weights (issue 26): the qmatmul kernel variants (part qmatmul: its GPU tests, bench/bench_qmatmul.py),
#      the qmatmul GPU tests, then bench/bench_qweights.py (part qweights, on request); the engine workload with
#      bf16, Q8_0 and Q4_K weights (part qengine: bench/bench_engine.py's mixed workload, a run per format);
#   5. Mistral-7B / Gemma-2-9B-shaped decode steps against HF's hybrid static cache (issue 23; parts
#      families and families_gemma);
#   6. the serving workloads (issue 21; part engine) and the HTTP server's load (issue 24; part server);
#   7. decode attention of every cache kind against torch SDPA and jax cuDNN (issue 22; part kinds: a call of its
#      own; where its budget stops it before the last shape, KINDS_RESUME=path/to/its.json runs the rest);
#   8. part quick: a short call for a scarce machine (the engine's long and shared-prefix workloads); part mixed: its
#      mixed workload with HF's peer and a profile of its decode-only step; part mixed_slots: it with 128 slots;
#      part sampled: it sampling (the sampling programs' cost); part prefill_quick: prefill and chunk without torch;
#      part memory: bench/step_memory.py on the long workload's shapes; part families_memory: the step's
#      weights-copy test and bench/step_memory.py on Gemma-2-9B's shape.
# Usage (device): OUT=/path bash bench/gpu_checks.sh [quick|mixed|mixed_nohf|mixed_slots|sampled|memory|families_memory|prefill_quick|prefill_sweep|q8_sweep|q8_loop_tests|q8_loop|q8_splits|paged_launch|d96|d96q|d96pad|q8_iq8|dp4a|dp4a_sweep|dp4a_rule|qstep_rule|qstep_normk|qstep_packed|qstep_short|qmid|qrows|qmid_sweep|qmid_rule|qdp4a_rows|qmid_k|qmid_k_short|qnibbles|qnibbles_short|qb16|qcross|qstep_launches|qdequant|qlayout|qlayout_rows|qhandover|qstep_flags|qstep_act|qstep_pdl|fp8|qweights_prefill|qmatmul_ncu|tests|mgpu|pingpong|mgpu_q8|ab|prefill|qmatmul|qweights|qengine|engine|server|server_trace|families|families_gemma|kinds|kinds_launch|kinds_d64|fused|fused_short|ragged ...]   (default: tests)
# Each part is time-boxed so one hang cannot eat the call; a short table of exit codes is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jkv_gpu_checks}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests)
declare -A rc

# GPU_CHECKS_BUDGET (seconds, optional): every part's limit is cut to what is left of it, so that one device call
# ends inside its own limit whatever the parts given (a part reached with under 10 s left is skipped).
budget_end=$((SECONDS + ${GPU_CHECKS_BUDGET:-100000}))

part_secs() {  # seconds: what a part asking for them gets (the call's budget may cut it)
  local left=$((budget_end - SECONDS))
  echo $(($1 < left ? $1 : left))
}

run() {  # name, seconds, command...
  local name=$1 secs
  secs=$(part_secs "$2")
  shift 2
  if [ "$secs" -lt 10 ]; then
    echo "== $name skipped: the call's budget is spent"
    rc[$name]=skipped
    return
  fi
  echo "== $name (limit ${secs}s): $*"
  timeout "$secs" "$@" >"$OUT/$name.log" 2>&1
  rc[$name]=$?
  tail -n 5 "$OUT/$name.log"
}

for part in "${parts[@]}"; do
  case $part in
    tests)
      run tests_triton 420 python -m pytest -q -m gpu tests/kernels/test_multi_token.py \
        tests/kernels/test_multi_token_paged.py tests/kernels/test_decode_kernel.py tests/kernels/test_paged_kernel.py \
        tests/kernels/test_q8_kernel.py tests/kernels/test_paged_q8_kernel.py tests/kernels/test_fp8_kernel.py \
        tests/kernels/test_decode_window.py \
        tests/kernels/test_decode_append.py tests/kernels/test_merge_partials.py tests/kernels/test_rms_norm.py \
        tests/attention tests/caches
      ;;
    mgpu)  # the Mosaic GPU tests (a call of their own: with the Triton tests they pass one call's 10 minutes)
      run tests_mgpu 240 python -m pytest -q -m gpu tests/kernels/test_multi_token_mgpu.py \
        tests/kernels/test_multi_token_mgpu_paged.py tests/kernels/test_decode_mgpu.py tests/kernels/test_decode_mgpu_paged.py
      run tests_mgpu_ws 120 python -m pytest -q -m gpu -k "not pingpong" tests/kernels/test_multi_token_mgpu_ws.py
      run tests_mgpu_ws_paged 180 python -m pytest -q -m gpu -k "not pingpong" \
        tests/kernels/test_multi_token_mgpu_ws_paged.py
      run tests_qmatmul_mgpu 120 python -m pytest -q -m gpu tests/kernels/test_qmatmul_mgpu.py
      ;;
    pingpong)  # the warp-specialised kernels' ping-pong schedule (issue 20; new: a barrier mistake would hang)
      run tests_mgpu_ws_pp 240 python -m pytest -q -m gpu -k pingpong tests/kernels/test_multi_token_mgpu_ws.py \
        tests/kernels/test_multi_token_mgpu_ws_paged.py
      run prefill_pp 480 python bench/bench_prefill.py --out "$OUT" --cases prefill-8k chunk-2k --rounds 5 \
        --ws-configs 16/4/128/2 16/4/64/3
      ;;
    quick)  # the short call of a scarce machine: what this session's changes need first (issue 21)
      run bench_engine_long_shared 560 python bench/bench_engine.py --model llama3-8b --no-hf --only long shared \
        --out "$OUT/bench_engine_long_shared.json"  # a failure names where it failed and the arrays then held
      ;;
    mixed)  # issue 21's workload with a profile of its decode-only step (idle gaps included) and HF's peer
      run bench_engine_mixed 560 python bench/bench_engine.py --model llama3-8b --only mixed --profile-steps 20 \
        --out "$OUT/bench_engine.json"
      ;;
    mixed_nohf)  # issue 21's workload alone (no HF peer, no profile): the acceptance figures in one short part
      run bench_engine_mixed_nohf 420 python bench/bench_engine.py --model llama3-8b --no-hf --only mixed \
        --out "$OUT/bench_engine_mixed.json"
      ;;
    mixed_slots)  # issue 21's TTFT question: the mixed workload with 128 slots (two waves, not four), no HF peer
      run bench_engine_mixed_128 560 python bench/bench_engine.py --model llama3-8b --no-hf --only mixed --slots 128 \
        --out "$OUT/bench_engine_mixed_128.json"
      ;;
    sampled)  # the mixed workload sampling (temperature 1, top-p 1 then 0.9): the sampling programs' cost
      run bench_engine_sampled 280 python bench/bench_engine.py --model llama3-8b --no-hf --only mixed \
        --temperature 1.0 --out "$OUT/bench_engine_sampled.json"
      run bench_engine_top_p 280 python bench/bench_engine.py --model llama3-8b --no-hf --only mixed \
        --temperature 1.0 --top-p 0.9 --out "$OUT/bench_engine_top_p.json"
      ;;
    memory)  # where the long workload's steps put their memory (compiled only: nothing runs)
      run step_memory 150 python bench/step_memory.py --model llama3-8b --slots 64 --max-len 16512 --buckets 64 2048 \
        --cli-xla-flags
      ;;
    families_memory)  # Gemma-2-9B's step memory (a 15.50 GiB allocation failed once; none at 1e74989: BENCHMARKS)
      run tests_weights_copy 150 python -m pytest -q tests/serving/test_step_memory.py
      run step_memory_gemma2 150 python bench/step_memory.py --model gemma2-9b --slots 1 --max-len 1256 --cache bf16 \
        --buckets 64 256
      ;;
    prefill_sweep)  # issue 20: the warp-specialised kernels' launch parameters (bq/heads/bk/stages, all lower on CPU)
      run prefill_sweep 580 python bench/bench_prefill.py --out "$OUT" --cases prefill-8k chunk-2k --rounds 3 \
        --no-torch --rows auto auto_paged mgpu_ws_pp mgpu_ws_paged_pp \
        --ws-configs 16/4/128/2 32/2/64/2 32/2/128/2 16/4/64/3
      tail -n 12 "$OUT/prefill_sweep.log"
      ;;
    q8_sweep)  # issue 22: the Q8 kernel's launch parameters at 1 x 131072 (0.56x bf16 against <= 0.55 on the H100)
      run q8_sweep 580 python scripts/bench_q8.py --out "$OUT" --sweep-shape 1x131072 \
        --shapes 1x131072 16x8192 128x2048 --sweep-configs 64/4/3 64/4/4 64/8/3 128/4/3 128/8/3 128/8/4 32/4/4 \
        --sweep-splits 0.5 1.5 2 --budget-s 300 --deadline-s 480
      ;;
    q8_loop_tests)  # issue 22: the GPU tests of the Q8 kernel's loop forms (decode_q8.LOOP_FORMS)
      run q8_loop_tests 420 python -m pytest -q -m gpu tests/kernels/test_q8_kernel.py \
        tests/kernels/test_paged_q8_kernel.py tests/kernels/test_fp8_kernel.py tests/kernels/test_decode_window.py \
        -k "loop_forms or vperm"
      ;;
    q8_iq8)  # issue 22: the int8-query form (scores as int8 x int8 products): its GPU tests, then its time beside vperm
      run tests_q8_iq8 240 python -m pytest -q -m gpu tests/kernels/test_q8_kernel.py \
        tests/kernels/test_paged_q8_kernel.py tests/kernels/test_decode_window.py -k iq8
      run q8_iq8 300 python bench/bench_q8_loop.py --out "$OUT" --rounds 5 --budget-s 240 \
        --variants vperm iq8 vperm+iq8 vperm+iq8/128/4 --paged-forms vperm vperm+iq8
      tail -n 30 "$OUT/q8_iq8.log"
      ;;
    q8_loop)  # issue 22: each loop form and launch of bench/bench_q8_loop.py timed beside bf16 (a call of its own)
      run q8_loop 580 python bench/bench_q8_loop.py --out "$OUT" --rounds 5 --budget-s 400 \
        --paged-forms default vperm vperm+iq8 vperm+srot+dsum+exp2
      tail -n 60 "$OUT/q8_loop.log"
      ;;
    q8_splits)  # issue 22: the Q8 and FP8 kernels with more programs a multiprocessor (more splits, smaller
      # programs) beside bf16; the bf16 Triton kernel at 0.5x / 2x its splits
      run q8_splits 580 python bench/bench_q8_loop.py --out "$OUT" --rounds 5 --budget-s 420 \
        --variants vperm 'vperm*2' 'vperm/64/2*4' 'vperm+iq8*2' --fp8 default '*2' 64 '64*2' --bf16-splits 0.5 2
      tail -n 50 "$OUT/q8_splits.log"
      ;;
    paged_launch)  # issue 22: the paged Q8 / FP8 kernels at their new stages (paged_q8.TABLE_STAGES): their GPU tests,
      # then paged Q8 at the default (five) and the old three stages beside contiguous Q8 and bf16, and the bf16 paged
      # kernel with 64-key blocks at four / five stages (its H200 gap)
      run tests_paged_q8 240 python -m pytest -q -m gpu tests/kernels/test_paged_q8_kernel.py tests/kernels/test_fp8_kernel.py \
        -k "paged or bench_shapes"
      run paged_launch 420 python bench/bench_q8_loop.py --out "$OUT" --rounds 5 --budget-s 300 --variants vperm \
        --paged-forms vperm vperm/3 --bf16-paged default 4/4 4/5 '4/5*2'
      tail -n 40 "$OUT/paged_launch.log"
      ;;
    d96)  # issue 22: head_dims read in power-of-two column chunks (Phi-3's 96): their GPU tests with the real
      # lowering, then 96 beside 128 and torch cuDNN at two long shapes
      run tests_d96 200 python -m pytest -q -m gpu tests/kernels/test_decode_kernel.py tests/kernels/test_paged_kernel.py \
        tests/kernels/test_decode_append.py tests/kernels/test_decode_window.py tests/kernels/test_merge_partials.py \
        -k "d96 or d80 or d48 or 96"
      run bench_d96 300 python bench/bench_decode_kinds.py --out "$OUT/d96" --rounds 5 --budget-s 220 \
        --shapes 1x131072:32/8/96 1x131072 16x8192:32/8/96 16x8192 --rows jkv_auto paged_triton torch_cudnn
      tail -n 14 "$OUT/bench_d96.log"
      ;;
    d96q)  # issue 22: the Q8 / FP8 decode kernels at head_dims read in power-of-two column parts (96, 160, 224, 80):
      # their GPU tests with the real lowering, the dp4a layout's model tests (activations rounded in the kernel by
      # default), then Q8 / FP8 at 96 beside bf16 and torch cuDNN at two long shapes
      run tests_d96q 300 python -m pytest -q -m gpu tests/kernels/test_q8_kernel.py tests/kernels/test_paged_q8_kernel.py \
        tests/kernels/test_fp8_kernel.py tests/models/test_quant_layout.py -k "d96 or d160 or d224 or d80 or dp4a"
      run bench_d96q 300 python bench/bench_decode_kinds.py --out "$OUT/d96q" --rounds 5 --budget-s 200 \
        --shapes 1x131072:32/8/96 16x8192:32/8/96 --rows jkv_auto paged_triton q8_triton q8paged_triton fp8_triton \
        fp8paged_triton torch_cudnn
      tail -n 14 "$OUT/bench_d96q.log"
      ;;
    d96pad)  # issue 22: the Q8 kernels' column forms at head_dims that are not powers of two (96 now padded to one
      # column-masked tile by default, 160 / 224 in power-of-two parts; each forced the other way) and the bf16 / FP8
      # kernels' padded tiles at 80 and 48 (now 4 stages, jkv_s3_triton the 3 before): their GPU tests (the stage
      # change's: d80 / d48 rows), then their times beside torch cuDNN
      run tests_d96pad 300 python -m pytest -q -m gpu tests/kernels/test_q8_kernel.py \
        tests/kernels/test_paged_q8_kernel.py tests/kernels/test_fp8_kernel.py tests/kernels/test_decode_kernel.py \
        tests/kernels/test_paged_kernel.py tests/kernels/test_decode_append.py tests/kernels/test_decode_window.py \
        -k "column_forms or d96 or d80 or d48"
      run bench_d96pad 300 python bench/bench_decode_kinds.py --out "$OUT/d96pad" --rounds 5 --budget-s 220 \
        --shapes 16x8192:32/8/80 1x131072:32/8/80 16x8192:32/8/48 1x131072:32/8/48 16x8192:32/8/96 --rows \
        jkv_auto jkv_triton jkv_s3_triton paged_triton q8_triton q8parts_triton q8paged_triton q8pagedparts_triton \
        fp8_triton fp8paged_triton torch_cudnn
      tail -n 14 "$OUT/bench_d96pad.log"
      ;;
    dp4a)  # issue 26: the integer-dot path's GPU tests, then its launches at M = 1 (row-major and interleaved words)
      run tests_dp4a 150 python -m pytest -q -m gpu tests/kernels/test_qmatmul_dp4a.py -k "Q8_0 or Q4_K or interleaved"
      run bench_dp4a 300 python bench/bench_qmatmul.py --out "$OUT" --rounds 3 --rows 1 --matrices wqkv,gate_up,down \
        --formats Q8_0,Q4_K --deadline-s 240 --variants dp4a,dp4a_split2x,dp4a_il,dp4a_il_split2x
      tail -n 30 "$OUT/bench_dp4a.log"
      ;;
    qlayout)  # issue 26: the large-M launch fix and the dp4a layout's GPU tests, then the batch-1 step in each layout
      run tests_qlayout 150 python -m pytest -q -m gpu tests/kernels/test_qmatmul.py tests/models/test_quant_layout.py \
        -k "prefill_sized or dp4a_layout or gpu_matches"
      run bench_qweights_b1 400 python bench/bench_qweights.py --out "$OUT/b1" --sections decode --batches 1 \
        --rounds 3 --decode-rows q8_0,q4_k,q8_0_dp4a,q4_k_dp4a
      grep -E "^B=|bandwidth" "$OUT/bench_qweights_b1.log" | tail -8
      ;;
    qlayout_rows)  # issue 26: where the dp4a layout's kernel should hand over to the dequantized matrix (DP4A_MAX_ROWS)
      run bench_qlayout_rows 560 python bench/bench_qmatmul.py --out "$OUT" --rounds 3 --rows 1,16,32,64 \
        --matrices wqkv,gate_up --formats Q8_0,Q4_K --deadline-s 500 --variants dp4a_il,dp4a_il_split2x,dequant
      tail -n 40 "$OUT/bench_qlayout_rows.log"
      ;;
    qhandover)  # issue 26: where quant.DEQUANT_MIN_ROWS (512, estimated) belongs: the Triton kernel's product
      # against the matrix dequantized for one XLA dot, by row count
      run bench_qhandover 560 python bench/bench_qmatmul.py --out "$OUT" --rounds 3 --rows 64,128,256,512,1024 \
        --matrices wqkv,gate_up,down --formats Q8_0,Q4_K --deadline-s 480 --variants dequant
      tail -n 40 "$OUT/bench_qhandover.log"
      ;;
    qstep_flags)  # issue 26: the batch-1 step in the dp4a layout as `jkv generate` runs it (command buffers over the
      # whole step) and with XLA's default flags (the step figures so far): what the launch gaps cost
      run bench_qstep_cli_flags 280 python bench/bench_qweights.py --out "$OUT/cli_flags" --sections decode \
        --batches 1 --rounds 3 --decode-rows q8_0_dp4a,q4_k_dp4a
      run bench_qstep_default_flags 280 python bench/bench_qweights.py --out "$OUT/default_flags" --sections decode \
        --batches 1 --rounds 3 --decode-rows q8_0_dp4a,q4_k_dp4a --default-xla-flags
      tail -n 8 "$OUT/bench_qstep_cli_flags.log" "$OUT/bench_qstep_default_flags.log"
      ;;
    qstep_pdl)  # issue 26: the batch-1 step with XLA's programmatic dependent launch (Hopper: a kernel starts while
      # the one before drains; --xla_gpu_enable_pdl) and without, two processes; the norm-rounded row beside
      rows=q4_k_dp4a,q4_k_dp4a_actx,q4_k_dp4a_normk
      run bench_qstep_pdl_on 270 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_pdl=true" python bench/bench_qweights.py \
        --out "$OUT/pdl_on" --sections decode --batches 1 --rounds 3 --decode-rows $rows
      run bench_qstep_pdl_off 270 python bench/bench_qweights.py --out "$OUT/pdl_off" --sections decode --batches 1 \
        --rounds 3 --decode-rows $rows
      tail -n 6 "$OUT/bench_qstep_pdl_on.log" "$OUT/bench_qstep_pdl_off.log"
      ;;
    qstep_act)  # issue 26: the dp4a layout's activations rounded in one launch per product (qmatmul_act), and in the
      # norm's launch (rms_norm.residual_rms_norm_rounded): their GPU tests, then the batch-1 step with the kernel's
      # rounding (the default), XLA's (_actx) and the norm's (_normk), interleaved in one process
      run tests_qmatmul_act 200 python -m pytest -q -m gpu tests/kernels/test_qmatmul_act.py
      run tests_norm_rounded 120 python -m pytest -q -m gpu tests/kernels/test_rms_norm_rounded.py
      run bench_qstep_act 360 python bench/bench_qweights.py --out "$OUT/act" --sections decode --batches 1 \
        --rounds 3 --decode-rows q8_0_dp4a,q4_k_dp4a,q8_0_dp4a_actx,q4_k_dp4a_actx,q8_0_dp4a_normk,q4_k_dp4a_normk
      tail -n 10 "$OUT/bench_qstep_act.log"
      # where the launches went (launches a step by kind), if the call's budget leaves room
      run bench_qstep_act_breakdown 200 python bench/bench_qweights.py --out "$OUT/act_bd" --breakdown \
        --decode-rows q4_k_dp4a,q4_k_dp4a_actx,q4_k_dp4a_normk
      grep "launches/step" "$OUT/bench_qstep_act_breakdown.log"
      ;;
    fp8)  # issue 22: the FP8 kernels' float16 products, the paged kernels' unmasked whole blocks, the base-2
      # softmax: their GPU tests, then FP8 and paged beside bf16, Q8 and torch cuDNN at four shapes in one process
      run tests_fp8_paged 330 python -m pytest -q -x -m gpu tests/kernels/test_fp8_kernel.py \
        tests/kernels/test_paged_kernel.py tests/kernels/test_decode_kernel.py tests/kernels/test_paged_q8_kernel.py \
        tests/kernels/test_multi_token.py
      run bench_fp8 240 python bench/bench_decode_kinds.py --out "$OUT/fp8" --rounds 5 --budget-s 150 \
        --shapes 1x131072 16x8192 128x2048 1x4096 --preflight --rows jkv_auto jkv_triton paged_triton \
        q8_triton q8paged_triton fp8_triton fp8paged_triton torch_cudnn
      tail -n 14 "$OUT/bench_fp8.log"
      # the short shape again with XLA's programmatic dependent launch (the split-K merge may start early)
      run bench_pdl_1x4096 120 env XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_pdl=true" python \
        bench/bench_decode_kinds.py --out "$OUT/pdl" --rounds 5 --budget-s 60 --shapes 1x4096 --preflight \
        --rows jkv_auto jkv_triton paged_triton torch_cudnn
      tail -n 6 "$OUT/bench_pdl_1x4096.log"
      ;;
    qweights_prefill)  # issue 26's prefill point: bf16 against each format through the kernels, dequantize + GEMM
      run bench_qweights_prefill 500 python bench/bench_qweights.py --out "$OUT" --sections prefill --rounds 3 \
        --prefill-tokens 2048 8192
      tail -n 12 "$OUT/bench_qweights_prefill.log"
      ;;
    dp4a_sweep)  # issue 26: launches of the interleaved dp4a product under Nsight Compute (kernel time, DRAM %)
      ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      declare -A sweep=(
        [Q4_K]=dp4a_il,dp4a_il_split2x,dp4a_il:1/128/128/16/4/1,dp4a_il:1/128/128/8/4/1,dp4a_il:1/64/128/16/2/1,dp4a_il:1/256/256/8/8/1,dp4a_il:1/128/256/8/4/2,dp4a_il:1/64/256/8/2/1,dp4a_il:1/128/128/28/4/1,dp4a_il:1/64/128/28/2/1
        [Q8_0]=dp4a_il,dp4a_il_split2x,dp4a_il:1/128/256/16/4/1,dp4a_il:1/128/128/16/4/1,dp4a_il:1/128/128/32/4/1,dp4a_il:1/64/256/16/2/1,dp4a_il:1/256/256/8/8/1,dp4a_il:1/128/128/28/4/1,dp4a_il:1/128/128/56/4/1,dp4a_il:1/64/128/28/2/1
      )
      # the matrices furthest from their floors in the H200 step (wqkv, wo, down: 0.34-0.59; gate_up 0.87)
      for fmt in Q4_K Q8_0; do
        for matrix in ${DP4A_SWEEP_MATRICES:-wqkv down}; do
          run "ncu_sweep_${fmt}_$matrix" 120 "$ncu" --clock-control none -k regex:jkv_qmatmul --section SpeedOfLight \
            --section Occupancy --section LaunchStats python bench/ncu_qmatmul.py --matrix "$matrix" --fmt "$fmt" \
            --rows 1 --variants "${sweep[$fmt]}"
          grep -E "^launch|Duration|DRAM Throughput|Achieved Occupancy" "$OUT/ncu_sweep_${fmt}_$matrix.log"
        done
      done
      ;;
    dp4a_rule)  # issue 26: the dp4a launch's new split rule (qmatmul_configs.DP4A_PROGRAMS) against the one before
      # (_rule2x) in the batch-1 step, then Nsight Compute on the matrices the first sweep left out
      run tests_dp4a_rule 150 python -m pytest -q -m gpu tests/kernels/test_qmatmul_dp4a.py -k "Q8_0 or Q4_K"
      run bench_dp4a_rule 300 python bench/bench_qweights.py --out "$OUT/rule" --sections decode --batches 1 \
        --rounds 3 --decode-rows q8_0_dp4a,q4_k_dp4a,q8_0_dp4a_rule2x,q4_k_dp4a_rule2x
      tail -n 8 "$OUT/bench_dp4a_rule.log"
      ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      q4k=dp4a_il,dp4a_il:1/128/256/14/4/1,dp4a_il:1/128/256/2/4/1,dp4a_il:1/128/256/8/4/1,dp4a_il:1/64/256/8/2/1,dp4a_il:1/128/128/56/4/1,dp4a_il:1/128/128/16/4/1
      q80=dp4a_il,dp4a_il:1/128/256/8/4/1,dp4a_il:1/128/256/2/4/1,dp4a_il:1/128/256/16/4/1,dp4a_il:1/128/256/56/4/1,dp4a_il:1/128/128/112/4/1,dp4a_il:1/128/128/32/4/1
      for cell in Q4_K:down Q8_0:down Q4_K:gate_up Q8_0:gate_up Q8_0:lm_head Q4_K:wo; do
        fmt=${cell%%:*} matrix=${cell##*:}
        list=$q80 && [ "$fmt" = Q4_K ] && list=$q4k
        run "ncu_rule_${fmt}_$matrix" 90 "$ncu" --clock-control none -k regex:jkv_qmatmul --section SpeedOfLight \
          --section Occupancy --section LaunchStats python bench/ncu_qmatmul.py --matrix "$matrix" --fmt "$fmt" \
          --rows 1 --variants "$list"
        grep -E "^launch|Duration|DRAM Throughput" "$OUT/ncu_rule_${fmt}_$matrix.log"
      done
      ;;
    qstep_rule)  # issue 26: the batch-1 step under the dp4a split rule and the one before (_rule2x), then where each
      # step's time goes (a profiled one-step program: the products' own times inside the CUDA graph, the split sums)
      run bench_qstep_rule 300 python bench/bench_qweights.py --out "$OUT/rule" --sections decode --batches 1 \
        --rounds 3 --decode-rows q8_0_dp4a,q4_k_dp4a,q8_0_dp4a_rule2x,q4_k_dp4a_rule2x,q8_0_dp4a_steps2
      tail -n 8 "$OUT/bench_qstep_rule.log"
      run bench_qstep_rule_bd 260 python bench/bench_qweights.py --out "$OUT/rule_bd" --breakdown \
        --decode-rows q4_k_dp4a,q4_k_dp4a_rule2x,q8_0_dp4a,q8_0_dp4a_rule2x
      grep -A14 "^breakdown" "$OUT/bench_qstep_rule_bd.log" | cut -c1-150
      ;;
    qstep_normk)  # issue 26: the norm kernel in programs of 1,024 columns (rms_norm.chunk_of; it was one program a
      # row, as slow as the two launches it replaced): its GPU tests, then the batch-1 step with it (_normk rows)
      run tests_normk 200 python -m pytest -q -m gpu tests/kernels/test_rms_norm.py tests/kernels/test_rms_norm_rounded.py
      run bench_qstep_normk 330 python bench/bench_qweights.py --out "$OUT/normk" --sections decode --batches 1 \
        --rounds 3 --decode-rows q8_0_dp4a,q4_k_dp4a,q8_0_dp4a_normk,q4_k_dp4a_normk
      tail -n 8 "$OUT/bench_qstep_normk.log"
      ;;
    qstep_packed)  # issues 26 and 22: q, k and v as one array into the decode kernel (decode_attention_packed;
      # LlamaOptions.pack_qkv): its GPU tests, then the batch-1 step with it and with the slices (_slices rows)
      run tests_packed 200 python -m pytest -q -m gpu tests/kernels/test_decode_append.py
      run bench_qstep_packed 400 python bench/bench_qweights.py --out "$OUT/packed" --sections decode --batches 1 \
        --rounds 3 --decode-rows q8_0_dp4a,q4_k_dp4a,bf16_slices,q8_0_dp4a_slices,q4_k_dp4a_slices
      tail -n 10 "$OUT/bench_qstep_packed.log"
      ;;
    qstep_short)  # the short call of a scarce machine: the packed decode kernel's GPU tests, then the Q4_K batch-1
      # step with q/k/v packed (the default) and sliced (_slices)
      run tests_packed 100 python -m pytest -q -m gpu tests/kernels/test_decode_append.py -k packed
      run bench_qstep_short 190 python bench/bench_qweights.py --out "$OUT/short" --sections decode --batches 1 \
        --rounds 3 --decode-rows q4_k_dp4a,q4_k_dp4a_slices
      tail -n 6 "$OUT/bench_qstep_short.log"
      ;;
    qmid)  # issue 26: decode at 64 sequences in the dp4a layout, its products of 17-127 rows on the row layout's kernel
      # over the words put back (the default, quant.DP4A_MID_ROWS) and dequantizing the matrix (_middeq), and the row layout
      run bench_qmid 560 python bench/bench_qweights.py --out "$OUT/mid" --sections decode --batches 64 --rounds 3 \
        --decode-rows q8_0,q4_k,q8_0_dp4a,q4_k_dp4a,q8_0_dp4a_middeq,q4_k_dp4a_middeq
      tail -n 10 "$OUT/bench_qmid.log"
      ;;
    qrows)  # issue 26: the row layout's dot kernel reading its code tiles in 16-byte loads (quantized_matmul.group_start:
      # a floor division had hidden the tiles' alignment from Triton, which read them a byte per load): its GPU tests,
      # then decode at 1 and 64 sequences in both layouts beside bf16
      run tests_qrows 150 python -m pytest -q -m gpu tests/kernels/test_qmatmul.py
      run bench_qrows 400 python bench/bench_qweights.py --out "$OUT/rows" --sections decode --batches 1,64 --rounds 3 \
        --decode-rows q8_0,q4_k,q8_0_dp4a,q4_k_dp4a
      tail -n 14 "$OUT/bench_qrows.log"
      ;;
    qmid_sweep)  # issue 26: the row layout's dot kernel at 64 rows (0.16-0.39 of its read floor in the decode step):
      # its GPU tests (the tiles' aligned loads), then its launch candidates (bench_qmatmul.mid_dot_variants)
      run tests_qrows 120 python -m pytest -q -m gpu tests/kernels/test_qmatmul.py
      run bench_qmid_sweep 420 python bench/bench_qmatmul.py --out "$OUT/mid_sweep" --rounds 2 --deadline-s 330 \
        --rows 64 --matrices wqkv,gate_up --formats Q8_0,Q4_K \
        --variants default,dot_bn64,dot_s4,dot_w8,dot_bk2x,dot_bk2x_s2,dot_bn2x_w8,dot_split2x,dequant
      tail -n 30 "$OUT/bench_qmid_sweep.log"
      ;;
    qmid_k)  # issue 26: the K-quants' dot launch at 64 rows from its two stages (two 91 KB programs, 8 warps a
      # multiprocessor): one-stage launches of 64, 32 and 16 columns (three to seven programs a multiprocessor),
      # 32 columns in two stages, twice the splits (dot_bn64: the three stages before)
      run bench_qmid_k 330 python bench/bench_qmatmul.py --out "$OUT/mid_k" --rounds 2 --deadline-s 270 \
        --rows 64 --matrices gate_up,wqkv,down --formats Q4_K,Q6_K \
        --variants default,dot_s1,dot_bnhalf_s1,dot_bnquarter_s1,dot_bnhalf,dot_split2x,dot_bn64
      tail -n 26 "$OUT/bench_qmid_k.log"
      ;;
    qmid_k_short)  # part qmid_k for what is left of a session's time: Q4_K's two large products, the one-stage launches
      run bench_qmid_k 170 python bench/bench_qmatmul.py --out "$OUT/mid_k" --rounds 2 --deadline-s 120 \
        --rows 64 --matrices gate_up,wqkv --formats Q4_K --variants default,dot_s1,dot_bnhalf_s1,dot_bnquarter_s1
      tail -n 12 "$OUT/bench_qmid_k.log"
      ;;
    qdp4a_rows)  # issue 26: the dp4a kernel at 2 and 4 rows (the step took 4.07 / 4.77 ms against 2.65 at one; its
      # registers grow with rows): the one-row split rule there (dp4a_il_prog) and 128-column steps (dp4a_il_bk128)
      run bench_qdp4a_rows 300 python bench/bench_qmatmul.py --out "$OUT/dp4a_rows" --rounds 2 --deadline-s 240 \
        --rows 2,4 --matrices wqkv,gate_up,down --formats Q8_0,Q4_K \
        --variants default,dp4a_il,dp4a_il_prog,dp4a_il_bk128,dp4a_il_split2x
      tail -n 40 "$OUT/bench_qdp4a_rows.log"
      ;;
    qmid_rule)  # issue 26: Q8_0's dot launch at 17-127 rows in 128-column steps of two stages (the rule before:
      # dot_prev): the GPU tests of the products with the real lowering, the products, then decode at 64 sequences
      run tests_qmid_rule 90 python -m pytest -q -m gpu tests/kernels/test_qmatmul.py -k "gpu_matches"
      run bench_qmid_rule 150 python bench/bench_qmatmul.py --out "$OUT/mid_rule" --rounds 3 --deadline-s 120 \
        --rows 32,64 --matrices wqkv,gate_up,down --formats Q8_0 --variants default,dot_prev
      tail -n 12 "$OUT/bench_qmid_rule.log"
      run bench_qmid_step 240 python bench/bench_qweights.py --out "$OUT/mid_step" --sections decode --batches 64 \
        --rounds 3 --decode-rows q8_0,q8_0_dp4a
      tail -n 6 "$OUT/bench_qmid_step.log"
      ;;
    qnibbles)  # issue 26: the 4-bit formats' nibbles into floats without conversion instructions
      # (block_formats.NIBBLE_CONVERT "bits"; compiled for sm_90 the Q4_K dot kernel at 64 rows issued 136 I2FP a
      # thread a step, Hopper's slow conversions): products at 1, 16 and 64 rows both ways (outputs must be equal)
      run bench_qnibbles 300 python bench/bench_int_codes.py --out "$OUT/nibbles" --rounds 3 --rows 1 16 64 \
        --formats Q4_K Q4_1 --budget-s 240
      tail -n 16 "$OUT/bench_qnibbles.log"
      # and the 4-bit dot launches in two stages (half the shared memory: two programs a multiprocessor)
      run bench_qmid_s2 240 python bench/bench_qmatmul.py --out "$OUT/mid_s2" --rounds 2 --deadline-s 200 \
        --rows 32,64 --matrices wqkv,gate_up --formats Q4_K,Q4_1 --variants default,dot_s2,dequant
      tail -n 14 "$OUT/bench_qmid_s2.log"
      ;;
    qnibbles_short)  # part qnibbles at 64 rows of Q4_K only, for a call on what is left of a session's time
      run bench_qnibbles 120 python bench/bench_int_codes.py --out "$OUT/nibbles" --rounds 3 --rows 64 \
        --formats Q4_K --budget-s 80
      tail -n 8 "$OUT/bench_qnibbles.log"
      run bench_qmid_s2 90 python bench/bench_qmatmul.py --out "$OUT/mid_s2" --rounds 2 --deadline-s 60 \
        --rows 64 --matrices gate_up --formats Q4_K --variants default,dot_s2
      tail -n 6 "$OUT/bench_qmid_s2.log"
      ;;
    qb16)  # issue 26: decode at 16 sequences in both layouts (measured when the dp4a layout's integer-dot kernel took
      # up to 16 rows; since quant.DP4A_MAX_ROWS = 4 its 16-row products run the row layout's kernel)
      run bench_qb16 400 python bench/bench_qweights.py --out "$OUT/b16" --sections decode --batches 16 --rounds 3 \
        --decode-rows q8_0,q4_k,q8_0_dp4a,q4_k_dp4a
      tail -n 8 "$OUT/bench_qb16.log"
      ;;
    qcross)  # issue 26: where the dp4a layout's integer-dot kernel stops paying (at 16 sequences it was 2.2-2.6x slower
      # than the row layout's kernel, at one 2x faster): the step at 2, 4 and 8 sequences in both layouts, then at 64
      # (the K-quants' two-stage dot launch)
      run bench_qcross 480 python bench/bench_qweights.py --out "$OUT/cross" --sections decode --batches 2,4,8,64 \
        --rounds 3 --decode-rows q8_0,q4_k,q8_0_dp4a,q4_k_dp4a
      tail -n 22 "$OUT/bench_qcross.log"
      ;;
    qstep_launches)  # issue 26: every kernel of the Q4_K batch-1 step, with what each XLA fusion does (xla_bodies in
      # the JSON), as it runs now and with the norms in XLA's fusions (_plainnorm): which launches are left
      run bench_qstep_launches 300 python bench/bench_qweights.py --out "$OUT/launches" --breakdown \
        --decode-rows q4_k_dp4a,q4_k_dp4a_plainnorm
      grep "^breakdown" "$OUT/bench_qstep_launches.log" | cut -c1-200
      ;;
    qdequant)  # issue 26: prefill-sized products dequantizing their matrix in one kernel launch
      # (pallas_kernels.dequantize_weights): its GPU tests, then prefill beside XLA's dequantization (the default)
      run tests_dequantize 200 python -m pytest -q -m gpu tests/kernels/test_dequantize_weights.py
      run bench_qdequant 360 python bench/bench_qweights.py --out "$OUT/deq" --sections prefill --rounds 3 \
        --prefill-tokens 2048 --prefill-rows q8_0,q4_k,q8_0_deqk,q4_k_deqk
      tail -n 6 "$OUT/bench_qdequant.log"
      ;;
    qmatmul_ncu)  # issue 26: Nsight Compute's view of the M = 1 products (speed of light, stalls, occupancy)
      ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      for fmt in Q8_0 Q4_K; do
        run "ncu_qmatmul_$fmt" 240 "$ncu" --clock-control none -k regex:jkv_qmatmul --section SpeedOfLight \
          --section WarpStateStats --section Occupancy --section MemoryWorkloadAnalysis --section LaunchStats \
          python bench/ncu_qmatmul.py --matrix wqkv --fmt "$fmt" --rows 1 --variants "${NCU_VARIANTS:-default,dp4a,dp4a_il,dp4a_il_split2x}"
      done
      ;;
    prefill_quick)  # issue 20 without torch: the dispatched kernels and the warp-specialised ones against cuDNN
      run prefill_quick 170 python bench/bench_prefill.py --out "$OUT" --cases prefill-8k chunk-2k --rounds 3 \
        --no-torch --rows mgpu_ws_pp mgpu_ws_paged_pp auto auto_paged triton triton_paged
      tail -n 4 "$OUT/prefill_quick.log"
      ;;
    mgpu_q8)  # the Mosaic GPU Q8 / FP8 decode kernel's tests (issue 22; new, so a part of its own)
      run tests_decode_mgpu_q8 300 python -m pytest -q -m gpu tests/kernels/test_decode_mgpu_q8.py
      ;;
    ab)
      if [ -d .ab_old/jkv ]; then
        # Each worker holds 8B-shaped weights and the batch-64 cache (~33 GiB): on an 80 GB card give each 48 %.
        mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
        fraction=0.45
        [ "${mib:-0}" -lt 100000 ] && fraction=0.48
        export JKV_AB_MEM_FRACTION=$fraction
        run ab 420 python bench/ab.py --a .ab_old --b . --rounds 7 --out "$OUT/ab.jsonl"
      else
        echo "== ab skipped: unpack the baseline first (git archive 1e4888c jkv pallas_kernels | tar -x -C .ab_old)"
      fi
      ;;
    prefill)
      run prefill 420 python bench/bench_prefill.py --out "$OUT" --rounds 5
      ;;
    qweights)
      run tests_qweights 240 python -m pytest -q -m gpu tests/kernels/test_qmatmul.py tests/loading/test_loading_native.py
      run bench_qweights 540 python bench/bench_qweights.py --out "$OUT" --rounds 5
      ;;
    qmatmul)
      run tests_qmatmul 200 python -m pytest -q -m gpu tests/kernels/test_qmatmul.py
      run bench_qmatmul 340 python bench/bench_qmatmul.py --out "$OUT" --rounds 2 --deadline-s 220  # the last cell it starts ends inside the limit
      ;;
    qengine)
      run bench_engine_qweights 580 python bench/bench_engine.py --model llama3-8b --only mixed --no-hf \
        --weights bf16 q8_0 q4_k --out "$OUT/bench_engine_qweights.json"
      ;;
    engine)  # issue 21: the three serving workloads, 8B-shaped random bf16 weights (HF's peer left out: time)
      run bench_engine 580 python bench/bench_engine.py --model llama3-8b --no-hf --out "$OUT/bench_engine.json"
      ;;
    server)  # issue 24: the HTTP server against the in-process engine (carry .whl_server: the server packages, as
      # `pip download -d .whl_server --python-version 3.12 --only-binary=:all: --platform manylinux_2_17_x86_64 ...`
      # of pyproject's serve and test extras brings them)
      # offline, with dependency resolution: what the image already satisfies stays as it is
      [ -d .whl_server ] && python -m pip install -q --no-index --find-links .whl_server fastapi uvicorn[standard] \
        prometheus-client openai httpx
      run load_server 580 python bench/load_server.py --shape llama3-8b --concurrency 1 16 64 \
        --out "$OUT/load_server.json"
      ;;
    server_trace)  # issue 24: where the served requests' first tokens wait (ingress, engine, egress; carry .whl_server)
      [ -d .whl_server ] && python -m pip install -q --no-index --find-links .whl_server fastapi uvicorn[standard] \
        prometheus-client openai httpx
      run load_server_trace 580 python bench/load_server.py --shape llama3-8b --concurrency 16 64 --trace-ttft \
        --out "$OUT/load_server_trace.json"
      ;;
    families)  # one model a call: each takes 4-8 minutes with HF's compiles (Gemma-2-9B: part families_gemma)
      run bench_families 580 python bench/bench_families.py --models mistral-7b --out "$OUT" --rounds 5
      ;;
    families_gemma)
      run bench_families_gemma 580 python bench/bench_families.py --models gemma2-9b --out "$OUT/gemma" --rounds 5
      ;;
    ragged)  # issue 22's ragged batch alone (32 lengths in 256..16384; never timed on a GPU): every cache kind with its
      # lengths against torch SDPA (which reads every sequence to the longest) and jax cuDNN (given the lengths)
      run bench_ragged 420 python bench/bench_decode_kinds.py --out "$OUT/ragged" --rounds 5 --budget-s 300 \
        --shapes 32xr256-16384
      tail -n 20 "$OUT/bench_ragged.log"
      ;;
    kinds_launch)  # issue 22: launch sweeps against torch cuDNN in the same rounds, where the H100 ran behind it or the
      # issue's 1x4096 target (docs/BENCHMARKS.md, "Launch sweeps at head_dim 64 and 1 x 4096"): 32x2048 at 9/3/64,
      # then 1x4096 (one launch's partials and its merge)
      b="jkv_triton@" q="q8_triton@"
      run kinds_launch_small 300 python bench/bench_decode_kinds.py --out "$OUT/launch_small" --rounds 5 \
        --budget-s 60 --shapes 32x2048:9/3/64 --rows jkv_auto jkv_triton q8_triton torch_cudnn --launches \
        ${b}128,4,-,- ${b}128,8,-,- ${b}64,8,-,- ${b}64,16,-,- ${b}256,2,-,- ${b}256,8,-,- ${b}256,4,8,- \
        ${b}256,4,2,- ${b}128,4,-,4 ${q}64,4,-,- ${q}64,8,-,- ${q}128,2,-,- ${q}128,4,-,- ${q}128,8,-,- \
        ${q}256,4,-,- ${q}64,4,8,- ${q}128,4,8,- ${q}64,8,2,-
      tail -n 12 "$OUT/kinds_launch_small.log"
      run kinds_launch_1x4096 250 python bench/bench_decode_kinds.py --out "$OUT/launch_1x4096" --rounds 5 \
        --budget-s 60 --shapes 1x4096 --rows jkv_auto jkv_triton q8_triton torch_cudnn --launches \
        ${b}128,8,-,- ${b}128,32,-,- ${b}64,32,-,- ${b}64,16,-,- ${b}256,8,-,- ${b}256,16,-,- ${b}128,16,8,- \
        ${b}128,16,2,- ${b}128,16,-,2 ${b}128,16,-,4 ${q}64,8,-,- ${q}64,32,-,- ${q}128,16,-,- ${q}128,8,-,- \
        ${q}32,32,-,-
      tail -n 12 "$OUT/kinds_launch_1x4096.log"
      ;;
    fused)  # issue 22: the splits merged by the last program to finish (fused_merge: one launch, where the merge was
      # a second); its GPU tests with the real lowering (a race would show in the repeated calls), then the
      # contiguous and paged rows with it against their two-launch defaults and torch cuDNN, where the merge's launch
      # is a large part of the time (1x4096) and where it is not
      run tests_fused 240 python -m pytest -q -m gpu -k "fused" tests/kernels/test_decode_kernel.py \
        tests/kernels/test_paged_kernel.py tests/kernels/test_decode_append.py tests/kernels/test_q8_kernel.py \
        tests/kernels/test_paged_q8_kernel.py
      b="jkv_triton@" p="paged_triton@" q="q8_triton@" f=",fused"
      run kinds_fused_1x4096 200 python bench/bench_decode_kinds.py --out "$OUT/fused_1x4096" --rounds 7 \
        --budget-s 60 --shapes 1x4096 --rows jkv_triton paged_triton q8_triton torch_cudnn --launches \
        ${b}-,-,-,-$f ${p}-,-,-,-$f ${q}-,-,-,-$f ${b}-,32,-,-$f ${b}64,32,-,-$f ${b}-,8,-,-$f ${q}-,32,-,-$f
      tail -n 12 "$OUT/kinds_fused_1x4096.log"
      run kinds_fused 240 python bench/bench_decode_kinds.py --out "$OUT/fused" --rounds 5 --budget-s 150 \
        --shapes 1x32768 16x8192 32x2048:9/3/64 1x4096:32/32/128 --rows jkv_triton paged_triton q8_triton \
        torch_cudnn --launches ${b}-,-,-,-$f ${p}-,-,-,-$f ${q}-,-,-,-$f
      tail -n 14 "$OUT/kinds_fused.log"
      ;;
    fused_short)  # part fused for what is left of a session's time: the contiguous kernel's GPU tests with it (the
      # race check among them), then 1x4096 with it beside the two-launch default and cuDNN
      run tests_fused 100 python -m pytest -q -m gpu -k "fused" tests/kernels/test_decode_kernel.py
      run kinds_fused_1x4096 150 python bench/bench_decode_kinds.py --out "$OUT/fused_1x4096" --rounds 7 \
        --budget-s 40 --shapes 1x4096 --rows jkv_triton q8_triton torch_cudnn --launches jkv_triton@-,-,-,-,fused \
        q8_triton@-,-,-,-,fused jkv_triton@-,32,-,-,fused
      tail -n 10 "$OUT/kinds_fused_1x4096.log"
      ;;
    kinds_d64)  # issue 22: the bf16 kernel at head_dim 64, behind torch cuDNN at 32x2048 and 8x16384 9/3/64 where
      # 128-key blocks in 2 warps and 4 splits came near it (docs/BENCHMARKS.md, "Launch sweeps at head_dim 64"):
      # 128-key blocks, 2 warps, with the split count the bf16 rule would give them (6 at 32x2048, 22 at 8x16384)
      # and around it, each shape in its own invocation; then the Q8 small-head rule where (b, kv head) programs
      # fill the GPU (128x2048: 2 splits of 2 warps) or are three (1x4096), beside twice its splits there
      b="jkv_triton@" rows="--rows jkv_auto paged_triton q8_triton torch_cudnn"
      run kinds_d64_a 200 python bench/bench_decode_kinds.py --out "$OUT/d64_a" --rounds 5 --budget-s 30 \
        --shapes 32x2048:9/3/64 $rows --launches ${b}128,6,2,- ${b}128,4,2,- ${b}128,8,2,- ${b}128,6,4,- \
        ${b}128,3,2,- ${b}128,6,2,2 ${b}64,8,2,- ${b}128,4,-,2
      run kinds_d64_b 200 python bench/bench_decode_kinds.py --out "$OUT/d64_b" --rounds 5 --budget-s 30 \
        --shapes 8x16384:9/3/64 $rows --launches ${b}128,22,2,- ${b}128,4,2,- ${b}128,8,2,- ${b}128,11,2,- \
        ${b}128,22,4,- ${b}64,8,2,- ${b}64,22,2,-
      run kinds_d64_c 200 python bench/bench_decode_kinds.py --out "$OUT/d64_c" --rounds 5 --budget-s 30 \
        --shapes 128x2048:9/3/64 1x4096:9/3/64 $rows --launches ${b}128,2,2,- ${b}128,1,2,- ${b}128,16,2,- \
        ${b}64,16,2,- q8_triton@128,4,2,- q8_triton@128,8,2,- q8_triton@64,16,4,-
      grep -h -A16 "^  row" "$OUT"/kinds_d64_*.log
      ;;
    kinds)
      # its own budget (start no shape after it) leaves a shape's ~2 minutes inside the part's limit
      secs=$(part_secs 580)
      run bench_decode_kinds "$secs" python bench/bench_decode_kinds.py --out "$OUT" --rounds 5 \
        --budget-s $((secs > 280 ? secs - 160 : secs / 2)) ${KINDS_RESUME:+--resume "$KINDS_RESUME"}
      ;;
    *) echo "unknown part $part (quick, mixed, mixed_nohf, mixed_slots, sampled, memory, families_memory, prefill_quick, prefill_sweep, q8_sweep, q8_loop_tests, q8_loop, q8_iq8, dp4a, dp4a_sweep, dp4a_rule, qstep_rule, qstep_normk, qstep_packed, qstep_short, qmid, qrows, qmid_sweep, qmid_rule, qdp4a_rows, qmid_k, qmid_k_short, qnibbles, qnibbles_short, qb16, qcross, qstep_launches, qdequant, qlayout, qlayout_rows, qhandover, qstep_flags, qstep_act, qstep_pdl, fp8, qweights_prefill, qmatmul_ncu, tests, mgpu, pingpong, mgpu_q8, ab, prefill, qmatmul, qweights, qengine, engine, server, server_trace, families, families_gemma, kinds, kinds_launch, kinds_d64, fused, fused_short, ragged)" ;;
  esac
done

echo
printf '%-16s %s\n' part exit
for name in "${!rc[@]}"; do printf '%-16s %s\n' "$name" "${rc[$name]}"; done
