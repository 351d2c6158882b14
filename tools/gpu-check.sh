#!/usr/bin/env bash
# The GPU check, in one device call (see tools/prepare-gpu-check.sh):
#   1. the parity tests on CUDA in f32, the half-precision tests (f16 and bf16 vs f32) and the
#      fused kernels' tests (f16, bf16),
#   2. a smoke generation in f16 with the fused kernels,
#   3. the diffusers baseline on the same GPU in the same call,
#   4. our benchmark on SD1.5's shapes in f16, once per variant: naive kernels, fused
#      kernels, and fused kernels with cuDNN convolutions (the second binary),
#   5. the ratios against the targets, one table per variant.
# Budget (limit 590 s a call): parity ~90 s, baseline <= 240 s, each variant <= 150 s.
# Everything it prints also lands in $OUT (the device tool brings it back).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
lib_dir() { dirname "$(find / -name "$1" -not -path '/proc/*' 2>/dev/null | head -1)"; }
export LD_LIBRARY_PATH=$(lib_dir 'libcublas.so.13*'):$(lib_dir 'libcudnn.so.9*'):${LD_LIBRARY_PATH:-}
for f in infusion-repl infusion-repl-cudnn integration; do   # python's lzma: no xz binary there
  [ -e ".carry/$f.xz" ] || continue
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    ".carry/$f.xz" ".carry/$f"
  chmod +x ".carry/$f"
done
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } | tee "$OUT/device.txt"

echo "== 1. parity on CUDA, f32 (+ f16/bf16 vs f32, + the fused kernels)"
INFUSION_TEST_DEVICE=cuda timeout 240 .carry/integration --test-threads 1 \
  tokenizer:: text_encoder:: unet:: vae:: scheduler:: txt2img:: attention:: infusion:: \
  train::loss metrics:: dtype:: fused:: 2>&1 | tee "$OUT/parity.txt" | grep -E "^test |test result|panicked"

echo "== 2. f16 smoke generation, fused kernels"
timeout 60 .carry/infusion-repl --device cuda --dtype f16 --kernels fused generate "a photo of a cat" \
  --steps 10 -o "$OUT/f16.png" 2>&1 | tail -2

echo "== 3. diffusers baseline, same GPU"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
PYTHONPATH=/tmp/site timeout 240 python3 .carry/diffusers_baseline.py --device cuda --dtype fp16 \
  --sections unet,gen,train --train-modes per_layer --json "$OUT/diffusers.json" > "$OUT/diffusers.txt" 2>&1
tail -3 "$OUT/diffusers.txt"

echo "== 4. our benchmark, SD1.5 shapes, f16, each variant followed by the ratios so far"
# Ratios after every variant: if the call runs out of time, what was measured still comes back.
bench() {  # name binary kernels
  timeout 150 ".carry/$2" --device cuda --dtype f16 --kernels "$3" bench --shapes sd15 \
    --repeats 3 --json "$OUT/ours-$1.json" 2>&1 | tee "$OUT/ours-$1.txt"
  python3 tools/compare_bench.py "$OUT/diffusers.json" "$OUT"/ours-*.json > "$OUT/ratios.md"
}
bench naive infusion-repl naive
bench fused infusion-repl fused
[ -x .carry/infusion-repl-cudnn ] && bench fused-cudnn infusion-repl-cudnn fused

echo "== 5. the baseline methods' training steps in diffusers/peft (beside bench's rows)"
PYTHONPATH=/tmp/site timeout 90 python3 tools/diffusers_method_steps.py --baseline .carry/diffusers_baseline.py \
  --device cuda --dtype fp16 --json "$OUT/diffusers-methods.json" 2>&1 | grep -v Warn | tail -4
python3 tools/compare_bench.py "$OUT/diffusers.json" "$OUT"/ours-*.json > "$OUT/ratios.md"

echo "== 6. ratios"
cat "$OUT/ratios.md"
