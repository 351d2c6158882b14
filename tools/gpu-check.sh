#!/usr/bin/env bash
# The GPU check, in one device call (see tools/prepare-gpu-check.sh):
#   1. the parity tests on CUDA in f32 (and the half-precision tests: f16 and bf16 vs f32),
#   2. a smoke generation in f16,
#   3. our benchmark on SD1.5's shapes in f16,
#   4. the diffusers baseline on the same GPU in the same call,
#   5. the ratios against the targets.
# Everything it prints also lands in $OUT (the device tool brings it back).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu-check-out}
mkdir -p "$OUT"
L=$(dirname "$(find / -name 'libcublas.so.13*' -not -path '*/proc/*' 2>/dev/null | head -1)")
export LD_LIBRARY_PATH=$L:${LD_LIBRARY_PATH:-}
for f in infusion-repl integration; do   # python's lzma: no xz binary needed there
  python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
    ".carry/$f.xz" ".carry/$f"
  chmod +x ".carry/$f"
done
{ date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } | tee "$OUT/device.txt"

echo "== 1. parity on CUDA, f32 (+ f16/bf16 vs f32)"
INFUSION_TEST_DEVICE=cuda timeout 240 .carry/integration --test-threads 1 \
  tokenizer:: text_encoder:: unet:: vae:: scheduler:: txt2img:: attention:: infusion:: \
  train::loss metrics:: dtype:: 2>&1 | tee "$OUT/parity.txt" | grep -E "^test |test result|panicked"

echo "== 2. f16 smoke generation"
timeout 60 .carry/infusion-repl --device cuda --dtype f16 generate "a photo of a cat" --steps 10 -o "$OUT/f16.png" 2>&1 | tail -2

echo "== 3. our benchmark, SD1.5 shapes, f16"
timeout 300 .carry/infusion-repl --device cuda --dtype f16 bench --shapes sd15 --repeats 3 --json "$OUT/ours.json" 2>&1 | tee "$OUT/ours.txt"

echo "== 4. diffusers baseline, same GPU"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
PYTHONPATH=/tmp/site timeout 300 python3 .carry/diffusers_baseline.py --device cuda --dtype fp16 \
  --sections unet,gen,train --train-modes per_layer --json "$OUT/diffusers.json" > "$OUT/diffusers.txt" 2>&1
tail -3 "$OUT/diffusers.txt"

echo "== 5. ratios"
python3 tools/compare_bench.py "$OUT/ours.json" "$OUT/diffusers.json" | tee "$OUT/ratios.md"
