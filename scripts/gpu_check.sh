#!/usr/bin/env bash
# The whole GPU check, in phases that each fit one device-tool call (10 minutes):
# (single parts: kernels, kernel_sweep, latency, throughput_1024_128, throughput_128_1024, gpu_tests, online,
#  quant, quant_fp8, quant_fp8_throughput, kv_fp8, moe_*, families, family_logits, window_throughput, structured,
#  scoring, all_tests_kernels, all_tests_worker)
#   bash scripts/gpu_check.sh engine   # kernel micro-benchmarks, batch-1/N decode latency, offline throughput (+HF, rooflines)
#   bash scripts/gpu_check.sh serve    # GPU tests, HTTP pipeline vs engine-direct, online rates, TP=2 (with 2 GPUs)
#   bash scripts/gpu_check.sh tp       # (2 GPUs) TP=2 batch-1 latency and saturation next to TP=1 on the same host
#   bash scripts/gpu_check.sh moe_kernels   # (then moe_check, moe_latency, moe_throughput: one call each) MoE, MOE_MODEL
#   bash scripts/gpu_check.sh profile  # where decode/prefill/mixed steps' time goes (torch.profiler), bf16 logits vs HF
# Carry .whl/ (the serving stack's wheels, see shared/device-wheels/README.md). Results land in $OUT/results.tar.gz
# plus a summary on stdout. Env knobs: MODEL, N, BIG_MODEL, SKIP_HF=1, SKIP_TESTS=1, DEVICE_FLAGS (CPU smoke runs), SWEEP=1 (the
# profile phase also sweeps the attention kernels' launch configurations, ~60 s).
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1 HEADRACE_CACHE=${HEADRACE_CACHE:-/tmp/headrace-cache}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-/tmp/out}; R=$OUT/run; mkdir -p "$R"
MODEL=${MODEL:-random:llama-3-8b}; N=${N:-1000}; DEVICE_FLAGS=${DEVICE_FLAGS:-}
# Random-weight models borrow the embedded model's tokenizer; its files travel in .tok/ (carry it) because
# the 98 MB embedded GGUF is over the device tool's transfer limit.
TOK=${TOK:-$PWD/.tok}
M="--model $MODEL --tokenizer $TOK --max-model-len 2048 $DEVICE_FLAGS"
[ "$MODEL" = embedded ] && M="--max-model-len 2048 $DEVICE_FLAGS"  # CPU smoke runs of the serve phase
HF="--baseline hf"; [ "${SKIP_HF:-0}" = 1 ] && HF=""
T0=$(date +%s)

step() {  # step NAME TIMEOUT_S CMD...: run with a time limit, keep its log, print its tail
  local name=$1 limit=$2; shift 2
  echo "=== $name (t+$(( $(date +%s) - T0 ))s, limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$R/$name.log" 2>&1; local rc=$?
  echo "--- $name rc=$rc"; grep -E "^\s*(RESULT|[A-Za-z].*(tok/s|TB/s|GB/s|TFLOP|ratio|roofline|ms|throughput|err|pass|PASS|FAIL|passed|failed|sweep))" "$R/$name.log" | tail -n 30
  return $rc
}

serve_start() {  # serve_start NAME PORT ARGS...: start a server in the background, wait until it is ready
  local name=$1 port=$2; shift 2
  python3 -m headrace.cli serve --port "$port" "$@" > "$R/$name.log" 2>&1 &
  echo $! > "$R/$name.pid"
  for _ in $(seq 1 300); do
    grep -q "headrace is ready" "$R/$name.log" && { echo "$name ready after $(( $(date +%s) - T0 ))s"; grep -E "KV budget|KV blocks|peak|captured" "$R/$name.log" | tail -n 6; return 0; }
    kill -0 "$(cat "$R/$name.pid")" 2>/dev/null || { echo "$name died"; tail -n 40 "$R/$name.log"; return 1; }
    sleep 1
  done
  echo "$name not ready"; tail -n 40 "$R/$name.log"; return 1
}

serve_stop() { kill -TERM "$(cat "$R/$1.pid")" 2>/dev/null; wait "$(cat "$R/$1.pid")" 2>/dev/null; sleep 2; }

bench_serve() {  # bench_serve NAME PORT TIMEOUT ARGS...
  local name=$1 port=$2 limit=$3; shift 3
  step "$name" "$limit" python3 -m headrace.cli bench serve --base-url "http://127.0.0.1:$port" --ignore-eos --tokenizer "$TOK" \
    --save-result --result-dir "$R" --result-filename "$name.json" --disable-tqdm "$@"
}

phase_kernels() {
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm --format=csv > "$R/nvidia-smi.txt" 2>&1; cat "$R/nvidia-smi.txt"
  step kernels_bench 90 python3 -m headrace.bench.kernels --decode-batch 1 64 --decode-context 2048 \
    --prefill-tokens 512 4096 --sampling-batch 1 256 --output-json "$R/kernels.json"
}

phase_kernel_sweep() {  # every launch-configuration grid, the small-batch GEMV against cuBLAS included (~5 min)
  step kernel_sweep 330 python3 -m headrace.bench.kernels --decode-batch 1 64 256 --decode-context 2048 \
    --prefill-tokens 512 4096 --sampling-batch 256 --sweep --gemv --gemv-batch 1 8 --output-json "$R/kernel_sweep.json"
}

phase_engine() {
  phase_kernels
  phase_latency
  phase_throughput_1024_128
  phase_throughput_128_1024
}

phase_latency() {
  step latency 140 python3 -m headrace.cli bench latency $M --input-len 128 --output-len 128 --batch-size 1 64 \
    --num-iters-warmup 2 --num-iters 5 $HF --hf-num-iters 1 --output-json "$R/latency.json"
}

phase_throughput_1024_128() {
  step throughput_1024_128 160 python3 -m headrace.cli bench throughput $M --dataset-name random --input-len 1024 \
    --output-len 128 --num-prompts "$N" $HF --hf-batch-sizes 64 --disable-tqdm --output-json "$R/throughput_1024_128.json"
}

phase_throughput_128_1024() {
  step throughput_128_1024 280 python3 -m headrace.cli bench throughput $M --dataset-name random --input-len 128 \
    --output-len 1024 --num-prompts "$N" $HF --hf-batch-sizes 64 --disable-tqdm --output-json "$R/throughput_128_1024.json"
}

phase_gpu_tests() {
  step gpu_tests 240 python3 -m pytest -q -x -p no:cacheprovider tests/kernels tests/services/gpu_worker/test_cuda_graphs.py \
    tests/services/gpu_worker/attention/test_triton_backend.py tests/services/gpu_worker/test_model_runner.py \
    tests/services/gpu_worker/test_sampler.py tests/services/gpu_worker/test_piecewise_graphs.py
}

phase_quant() {  # quantized layers: GPU tests, the W4A16 kernel against bf16 cuBLAS, int4 decode vs bf16 in one run
  step quant_tests 200 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_w4a16_matmul.py tests/kernels/test_fp8_gemv.py \
    tests/kernels/test_fp8_quant.py tests/kernels/test_fp8_block_matmul.py tests/services/gpu_worker/model/quant/test_quantized_models.py \
    tests/services/gpu_worker/loader/test_quantized_checkpoints.py -k "gpu or w4a16 or fp8"
  step w4a16_kernels 120 python3 -m headrace.bench.kernels --decode-batch --prefill-tokens --sampling-batch --w4a16 \
    --w4a16-batch 1 16 64 256 --output-json "$R/w4a16.json"
  step latency_w4a16 220 python3 -m headrace.cli bench latency $M --quantization gptq --input-len 128 --output-len 128 \
    --batch-size 1 64 --num-iters-warmup 2 --num-iters 5 --output-json "$R/latency_w4a16.json"
}

phase_quant_fp8() {  # fp8 (online, per-channel weights, per-token activations) decode vs bf16 in one run
  step latency_fp8 220 python3 -m headrace.cli bench latency $M --quantization fp8 --input-len 128 --output-len 128 \
    --batch-size 1 64 --num-iters-warmup 2 --num-iters 5 --output-json "$R/latency_fp8.json"
}

phase_quant_fp8_throughput() {  # fp8 saturation: 1,000 x 1024/128 engine-direct, bf16 then fp8 in one run
  step throughput_bf16 200 python3 -m headrace.cli bench throughput $M --dataset-name random --input-len 1024 \
    --output-len 128 --num-prompts "$N" --disable-tqdm --output-json "$R/throughput_bf16.json"
  step throughput_fp8 200 python3 -m headrace.cli bench throughput $M --quantization fp8 --dataset-name random \
    --input-len 1024 --output-len 128 --num-prompts "$N" --disable-tqdm --output-json "$R/throughput_fp8.json"
}

phase_kv_fp8() {  # fp8 KV cache: its kernel tests on the GPU, then 1,000 x 128/1024 engine-direct, bf16 KV then fp8 KV
  step kv_fp8_tests 120 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kv_fp8.py \
    tests/services/gpu_worker/attention/test_kv_fp8_backends.py
  step throughput_kv_bf16 220 python3 -m headrace.cli bench throughput $M --dataset-name random --input-len 128 \
    --output-len 1024 --num-prompts "$N" --disable-tqdm --output-json "$R/throughput_kv_bf16.json"
  step throughput_kv_fp8 220 python3 -m headrace.cli bench throughput $M --kv-cache-dtype fp8 --dataset-name random \
    --input-len 128 --output-len 1024 --num-prompts "$N" --disable-tqdm --output-json "$R/throughput_kv_fp8.json"
}

phase_online() {  # the online rates and batch 1 through HTTP, without the saturation run
  if serve_start serve_tp1 8000 $M; then
    bench_serve online_4rps 8000 70 --dataset-name sharegpt-like --request-rate 4 --num-prompts 120
    bench_serve online_16rps 8000 75 --dataset-name sharegpt-like --request-rate 16 --num-prompts 400
    bench_serve batch1_tp1 8000 30 --dataset-name random --random-input-len 128 --random-output-len 128 --num-prompts 8 --max-concurrency 1
    serve_stop serve_tp1
    grep -E "WARNING" "$R/serve_tp1.log" | head -n 20
  fi
}

phase_serve() {
  [ "${SKIP_TESTS:-0}" = 1 ] || phase_gpu_tests
  # The full HTTP pipeline at saturation (compare with throughput_1024_128 from the engine phase), then online rates.
  if serve_start serve_tp1 8000 $M; then
    bench_serve serve_saturation 8000 150 --dataset-name random --random-input-len 1024 --random-output-len 128 --num-prompts "$N"
    bench_serve online_4rps 8000 70 --dataset-name sharegpt-like --request-rate 4 --num-prompts 120
    bench_serve online_16rps 8000 75 --dataset-name sharegpt-like --request-rate 16 --num-prompts 400
    bench_serve batch1_tp1 8000 30 --dataset-name random --random-input-len 128 --random-output-len 128 --num-prompts 8 --max-concurrency 1
    serve_stop serve_tp1
    grep -E "WARNING" "$R/serve_tp1.log" | head -n 20
  fi
  if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    serve_tp2_runs
    BIG=${BIG_MODEL:-$(python3 -c 'import torch; print("random:llama-3-70b-40l" if torch.cuda.get_device_properties(0).total_memory < 100e9 else "random:llama-3-70b")')}
    if serve_start serve_big_tp2 8002 --model "$BIG" --tokenizer "$TOK" --max-model-len 2048 --tensor-parallel-size 2 --gpu-memory-utilization 0.95; then
      bench_serve big_tp2 8002 40 --dataset-name random --random-input-len 128 --random-output-len 64 --num-prompts 8 --max-concurrency 4
      serve_stop serve_big_tp2
    fi
  fi
}

serve_tp2_runs() {  # TP=2: batch-1 latency (decode graphs capture the all-reduces) and saturation
  if serve_start serve_tp2 8001 $M --tensor-parallel-size 2; then
    bench_serve batch1_tp2 8001 60 --dataset-name random --random-input-len 128 --random-output-len 128 --num-prompts 8 --max-concurrency 1
    bench_serve saturation_tp2 8001 120 --dataset-name random --random-input-len 1024 --random-output-len 128 --num-prompts "$N"
    serve_stop serve_tp2
  fi
}

phase_tp() {  # tensor parallelism alone (2+ GPUs), beside TP=1 batch-1 latency on the same host
  serve_tp2_runs
  if serve_start serve_tp1 8000 $M; then
    bench_serve batch1_tp1 8000 30 --dataset-name random --random-input-len 128 --random-output-len 128 --num-prompts 8 --max-concurrency 1
    serve_stop serve_tp1
  fi
}

phase_profile() {
  step step_profile 130 python3 -m headrace.bench.step_profile $M --batch-size 1 64 256 --steps 20 --prefill-prompts 32 \
    --mixed-decodes 248 --output-json "$R/step_profile.json"
  # A short prompt's prefill alone (time to first token): kernels vs wall, and the host side under cProfile.
  step prefill_profile 90 python3 -m headrace.bench.step_profile $M --batch-size 1 --steps 5 --prefill-prompts 1 \
    --prefill-len 128 --host-profile 128 --output-json "$R/prefill_profile.json"
  step logits 110 python3 -m headrace.bench.gpu_check --out "$R" --sections logits --backends triton --preset "${MODEL#random:}" --tokenizer "$TOK"
  [ "${SWEEP:-0}" = 1 ] && step kernel_sweep 150 python3 -m headrace.bench.kernels --decode-batch 1 64 256 --decode-context 2048 \
    --prefill-tokens 512 4096 --sampling-batch --sweep --reps 50 --output-json "$R/kernel_sweep.json"
}

phase_all_tests() {  # every GPU test in the tree (kernels, attention backends incl. fp8 KV, graphs, MoE, quant), then the
  # speculative engine's verify steps through the GPU kernels
  # The CPU oracle tests beside them (tests/services/gpu_worker/test_*_vs_hf.py and those loading the embedded
  # GGUF) are left out: on the card they took the call's time and failed on the device's older transformers.
  # -v: each test named as it ends, so a run cut by the step's limit still says which failed; -rfE --tb=line: where.
  # Two halves, each a call of its own when run as phases all_tests_kernels / all_tests_worker (one call of
  # both ran past 330 s at ~90% on an H100, 2026-12-05).
  phase_all_tests_kernels
  phase_all_tests_worker
}

phase_all_tests_kernels() {  # the Triton kernels against their references (compiles dominate)
  step gpu_tests_kernels 420 python3 -m pytest -v -rfE --tb=line -p no:cacheprovider tests/kernels \
    tests/headrace/bench/test_kernels.py tests/headrace/bench/test_moe_kernel_bench.py
}

phase_all_tests_worker() {  # attention backends, quantized layers, loaders, graphs, runner, samplers, speculation
  step gpu_tests_worker 360 python3 -m pytest -v -rfE --tb=line -p no:cacheprovider \
    tests/services/gpu_worker/attention tests/services/gpu_worker/model/quant tests/services/gpu_worker/loader \
    tests/services/gpu_worker/test_cuda_graphs.py tests/services/gpu_worker/test_piecewise_graphs.py \
    tests/services/gpu_worker/test_moe_graphs.py tests/services/gpu_worker/test_model_runner.py \
    tests/services/gpu_worker/test_sampler.py tests/services/gpu_worker/test_rejection_sampler.py
  HEADRACE_SPEC_TEST_DEVICE=cuda step spec_gpu_tests 120 python3 -m pytest -q -p no:cacheprovider tests/headrace/test_speculative_engine.py
}

phase_spec_batch64() {  # issue 19: batch 64 with n-gram speculation on but nothing accepted (random weights), vs off
  step latency_nospec 120 python3 -m headrace.cli bench latency $M --input-len 128 --output-len 128 --batch-size 64 \
    --num-iters-warmup 2 --num-iters 5 --output-json "$R/latency_nospec.json"
  step latency_spec 120 python3 -m headrace.cli bench latency $M --input-len 128 --output-len 128 --batch-size 64 \
    --num-iters-warmup 2 --num-iters 5 --output-json "$R/latency_spec.json" --speculative-config \
    '{"method":"ngram","num_speculative_tokens":4,"prompt_lookup_min":2,"prompt_lookup_max":4,"disable_by_batch_size":8}'
}

MOE_MODEL=${MOE_MODEL:-random:mixtral-8x7b}

phase_moe_kernels() {  # the fused MoE kernel over the experts it touches vs copy bandwidth, then a block-size sweep
  step moe_kernels 150 python3 -m headrace.bench.kernels --decode-batch --prefill-tokens --sampling-batch \
    --moe --moe-model "${MOE_MODEL#random:}" --moe-batch 1 16 64 256 --reps 50 --output-json "$R/moe_kernels.json"
  step moe_sweep 400 python3 -m headrace.bench.kernels --decode-batch --prefill-tokens --sampling-batch \
    --moe --moe-model "${MOE_MODEL#random:}" --moe-batch 1 64 --sweep --reps 20 --output-json "$R/moe_sweep.json"
}

phase_moe_check() {  # MoE GPU tests; bf16 logits of cut-down Mixtral / Qwen3-MoE (real layer shapes) vs transformers fp32
  step moe_gpu_tests 200 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_fused_moe.py \
    tests/services/gpu_worker/test_moe_graphs.py
  for preset in mixtral-8x7b-4l qwen3-30b-a3b-12l; do
    mkdir -p "$R/$preset"
    step "moe_logits_$preset" 180 python3 -m headrace.bench.gpu_check --out "$R/$preset" --sections logits \
      --backends triton --preset "$preset" --tokenizer "$TOK"
  done
}

phase_moe_latency() {  # Mixtral-8x7B batch-1/64 decode vs the roofline of the bytes a step reads, HF on the same weights
  step moe_latency 560 python3 -m headrace.cli bench latency --model "$MOE_MODEL" --tokenizer "$TOK" --max-model-len 2048 \
    $DEVICE_FLAGS --input-len 128 --output-len 128 --batch-size 1 64 --num-iters-warmup 2 --num-iters 5 $HF \
    --hf-num-iters 1 --output-json "$R/moe_latency.json"
}

phase_moe_throughput() {  # Mixtral-8x7B 1,000 x 1024/128 engine-direct, total tok/s vs the active parameters' compute roofline
  step moe_throughput 560 python3 -m headrace.cli bench throughput --model "$MOE_MODEL" --tokenizer "$TOK" \
    --max-model-len 2048 $DEVICE_FLAGS --dataset-name random --input-len 1024 --output-len 128 --num-prompts "$N" \
    --disable-tqdm --output-json "$R/moe_throughput.json"
}

phase_families() {  # new families (issue 14): window/soft-cap kernels and graphs on the GPU, bf16 logits vs transformers fp32
  step families_gpu_tests 240 python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_sliding_window_attention.py \
    tests/kernels/test_paged_decode_attention.py tests/kernels/test_prefill_attention.py \
    tests/services/gpu_worker/test_cuda_graphs.py tests/services/gpu_worker/test_piecewise_graphs.py \
    tests/services/gpu_worker/attention/test_triton_backend.py
  for preset in gemma-2-9b gemma-3-12b falcon-7b phi-3-mini-longrope; do
    mkdir -p "$R/$preset"
    step "logits_$preset" 150 python3 -m headrace.bench.gpu_check --out "$R/$preset" --sections logits \
      --backends triton --preset "$preset" --tokenizer "$TOK" --prompt-len 1536
  done
}

phase_family_logits() {  # issue 14: every new family's bf16 logits vs transformers fp32 (tests: all_tests), one call
  for preset in gemma-2-9b gemma-3-12b falcon-7b phi-3-mini-longrope mixtral-8x7b-4l qwen3-30b-a3b-12l; do
    mkdir -p "$R/$preset"
    step "logits_$preset" 120 python3 -m headrace.bench.gpu_check --out "$R/$preset" --sections logits \
      --backends triton --preset "$preset" --tokenizer "$TOK" --prompt-len 1536
  done
}

phase_moe_kernel_b64() {  # issue 14: the fused MoE kernel at batch 1 and 64 vs copy bandwidth over the experts it touches
  step moe_kernels 150 python3 -m headrace.bench.kernels --decode-batch --prefill-tokens --sampling-batch \
    --moe --moe-model "${MOE_MODEL#random:}" --moe-batch 1 64 --reps 50 --output-json "$R/moe_kernels.json"
}

phase_window_throughput() {  # Gemma-3-12B 4096/1024, windowed layers vs the window disabled, one call (300
  # prompts each ran past 280 s on an H100, 2026-12-05: 100 by default)
  for m in gemma-3-12b gemma-3-12b-no-window; do
    step "throughput_$m" 280 python3 -m headrace.cli bench throughput --model "random:$m" --tokenizer "$TOK" \
      --max-model-len 5120 $DEVICE_FLAGS --dataset-name random --input-len 4096 --output-len 1024 \
      --num-prompts "${WINDOW_PROMPTS:-100}" \
      --disable-tqdm --output-json "$R/throughput_$m.json"
  done
}

phase_structured() {  # issue 15: one schema x 64 streams vs unconstrained, 200 new schemas during unconstrained streams
  if serve_start serve_structured 8000 $M --max-num-seqs 256; then
    step structured 400 python3 -m headrace.cli bench structured --base-url http://127.0.0.1:8000 --tokenizer-dir "$TOK" \
      --vocab-size 128256 --output "$R/structured.json"
    serve_stop serve_structured
  fi
}

phase_scoring() {  # issue 17: prompt logprobs of a chunked prefill against decode logprobs, piecewise graphs captured
  if serve_start serve_scoring 8011 $M --max-num-batched-tokens 128; then
    step scoring 120 python3 scripts/check_scoring.py --base-url http://127.0.0.1:8011 --tolerance 0.1
    serve_stop serve_scoring
  fi
  step scoring_graphs 200 python3 -m pytest -q -x -p no:cacheprovider tests/services/gpu_worker/test_piecewise_graphs.py
}

for phase in "$@"; do "phase_$phase"; done
tar -czf "$OUT/results.tar.gz" -C "$OUT" run && echo "results: $OUT/results.tar.gz ($(( $(date +%s) - T0 ))s)"
