#!/usr/bin/env bash
# Everything issue 13 measures on a GPU, in one device call that fits its 600 s limit:
#
#     bash bench/gpu_session.sh "$OUT" [bench gpu options]   # on the device machine; results under $OUT
#
# 1. installs the carried wheels (.whl/, made here by ../shared/gpu/prepare_wheels.sh) when they
#    are there: the GPU machine has torch, transformers and peft but not deepspeed or datasets;
# 2. one adapted layer, plain autograd vs the fused node, bf16 at 8192 tokens, with op counts
#    (python -m bench adapter_layer; ~30 s);
# 3. python -m bench gpu: PEFT vs ours, every method, ZeRO-2 and ZeRO-3, the 8B shape, within
#    GPU_BUDGET_S seconds (default 480, so that the whole call stays under 600 s).
# Each step writes its own files, so a step cut short still leaves the earlier ones.
# SMOKE=1: the same steps on CPU, small (tests/test_bench_gpu.py runs it so).
set -u
out=${1:?usage: bash bench/gpu_session.sh OUT_DIR [bench gpu options]}
shift
mkdir -p "$out"
if compgen -G ".whl/*.whl" > /dev/null; then
    mkdir -p /tmp/site
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 3
    export PYTHONPATH=$PWD:/tmp/site
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu_card.csv" 2>&1
python3 -c "import torch, deepspeed, transformers; print(torch.__version__, deepspeed.__version__, transformers.__version__)" \
    > "$out/versions.txt" 2>&1
if [ "${SMOKE:-0}" = 1 ]; then
    layer=(--dtype fp32 --tokens 256 --in_features 64 --out_features 64 --repeats 1) gpu=(--smoke)
    export DS_ACCELERATOR=cpu
else
    layer=(--dtype bf16 --tokens 8192) gpu=(--peak_tflops "${PEAK_TFLOPS:-989}")
fi
timeout 90 python3 -m bench adapter_layer "${layer[@]}" --count_ops --json "$out/adapter_layer.json" \
    > "$out/adapter_layer.txt" 2>&1
timeout $(( ${GPU_BUDGET_S:-480} + 60 )) python3 -m bench gpu --out "$out" "${gpu[@]}" \
    --budget_s "${GPU_BUDGET_S:-480}" "$@" > "$out/gpu.log" 2>&1
status=$?
rm -rf "$out"/runs "$out"/*.jsonl 2>/dev/null  # run folders and the generated data: large, not results
cat "$out/gpu_card.csv" "$out/versions.txt" "$out/adapter_layer.txt" "$out/gpu.md" 2>/dev/null | tail -80
exit $status
