#!/usr/bin/env bash
# Cross-build a candle (feature "cuda") binary for an NVIDIA H100 (compute capability 9.0)
# on a machine with NO GPU and NO CUDA toolkit (only crates.io + PyPI reachable).
#
# Tested: candle-core/-nn/-transformers 0.11.1 (cudarc 0.19.10, cudaforge 0.1.6),
#         Rust 1.95, Debian 12 x86_64, gcc 12.2, 2 cores: ~12 min cold build.
# CUDA pieces = CUDA 13.0.2 wheels from PyPI, exactly the set that torch 2.11.0 (cu130)
# pins via cuda-toolkit==13.0.2, so the .so files on the GPU box are the same ones.
#
# Copied from ../shared/cuda/build.sh (the tested recipe) with two changes: `cargo metadata` gets
# $CARGO_FLAGS, so a crate whose CUDA support is an optional feature finds cudarc; and with
# TEST_OUT=path it also builds the integration-test binary (for the parity run on the GPU); and
# MODE=check only type-checks every target with the CUDA toolchain (CI: no GPU needed).
#
# usage: build.sh [CRATE_DIR] [BIN_NAME] [OUT_FILE]     (extra cargo flags: CARGO_FLAGS="--features cuda")
#   defaults: <this dir>/probe  candle_probe  ./.carry/candle_probe
# env:   WORK (default /tmp/cudaprobe)  CARGO_TARGET_DIR (default $WORK/target)
#
# Run on the GPU machine (driver >= 580, CUDA 13.0; torch 2.11+cu130 installed):
#   export LD_LIBRARY_PATH=$(python3 -c 'import sysconfig;print(sysconfig.get_paths()["purelib"])')/nvidia/cu13/lib:$LD_LIBRARY_PATH
#   ./candle_probe            # libcuda.so.1 comes from the driver
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CRATE_DIR=$(cd "${1:-$HERE/probe}" && pwd)
BIN_NAME=${2:-candle_probe}
OUT_FILE=${3:-$PWD/.carry/$BIN_NAME}
WORK=${WORK:-/tmp/cuda-build}
CUDA=$WORK/cuda          # toolkit-shaped dir: bin/nvcc, include/, lib/, lib64 -> lib, nvvm/
WHEELS=$WORK/wheels
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$WORK/target}
mkdir -p "$WORK" "$WHEELS"
T0=$(date +%s)

# ---- 1. nvcc + headers + link-time libs: CUDA 13.0.2 wheels from PyPI (pinned + hashed) ----
if [ ! -x "$CUDA/bin/nvcc" ] || [ ! -e "$CUDA/lib/libcublas.so" ]; then
  cat > "$WORK/cuda-wheels.txt" <<'EOF'
nvidia-cuda-nvcc==13.0.88 --hash=sha256:56fe502eb77625a12f25172caa3cdddb4e4c8ba2c8c17dba44b164761b380f03
nvidia-cuda-crt==13.0.88 --hash=sha256:2c8043c7c9e02492716426e9919fc78d2c5b3b2a7a768a88e952676b08aa55a4
nvidia-nvvm==13.0.88 --hash=sha256:c5f41ffeb6466944a026dfa5317d7d85355c119bbec279205d22f1869d1054e0
nvidia-cuda-cccl==13.0.85 --hash=sha256:e0da7ad981f3a8aff08241b5bfc1af868742a63e2762f53a5171c492ef242649
nvidia-cuda-runtime==13.0.96 --hash=sha256:7f82250d7782aa23b6cfe765ecc7db554bd3c2870c43f3d1821f1d18aebf0548
nvidia-cuda-nvrtc==13.0.88 --hash=sha256:ad9b6d2ead2435f11cbb6868809d2adeeee302e9bb94bcf0539c7a40d80e8575
nvidia-curand==10.4.0.35 --hash=sha256:1aee33a5da6e1db083fe2b90082def8915f30f3248d5896bcec36a579d941bfc
nvidia-cublas==13.1.0.3 --hash=sha256:ee8722c1f0145ab246bccb9e452153b5e0515fd094c3678df50b2a0888b8b171
EOF
  python3 -m pip download -q --no-deps --only-binary=:all: --require-hashes \
      -r "$WORK/cuda-wheels.txt" -d "$WHEELS"
  rm -rf "$WORK/unpack" "$CUDA"
  mkdir -p "$WORK/unpack"
  for w in "$WHEELS"/nvidia_*.whl; do
    python3 -m zipfile -e "$w" "$WORK/unpack"        # every wheel unpacks into nvidia/cu13/
  done
  mv "$WORK/unpack/nvidia/cu13" "$CUDA"
  rm -rf "$WORK/unpack"
  chmod +x "$CUDA"/bin/* "$CUDA"/nvvm/bin/*          # zip extraction drops exec bits
  ln -sfn lib "$CUDA/lib64"                          # cudaforge/cudarc look in lib64 too
  for so in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10 libnvrtc.so.13; do
    ln -sfn "$so" "$CUDA/lib/${so%%.so*}.so"         # wheels ship only versioned names
  done
fi

# ---- 1b. cuDNN (only with the `cudnn` feature): the link needs libcudnn.so. Only the loader
# library is kept (125 KB; it dlopens the engine libraries at run time, which the GPU machine's
# PyTorch install has). cuDNN 9.13 is the first release built for CUDA 13; any 9.x loads.
if [[ "${CARGO_FLAGS:-}" == *cudnn* ]] && [ "${MODE:-build}" != check ] && [ ! -e "$CUDA/lib/libcudnn.so" ]; then
  echo 'nvidia-cudnn-cu13==9.13.0.50 --hash=sha256:2150b4850725d30653ec3e365f0732e3e2e3eb8633cf3bd2d3117628dea8b4f9' \
    > "$WORK/cudnn-wheel.txt"
  python3 -m pip download -q --no-deps --only-binary=:all: --require-hashes \
      --platform manylinux_2_27_x86_64 --python-version 3.12 -r "$WORK/cudnn-wheel.txt" -d "$WHEELS"
  python3 - "$WHEELS"/nvidia_cudnn_cu13-9.13.0.50-*.whl "$CUDA/lib" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("nvidia/cudnn/lib/libcudnn.so.9") as src, \
        open(sys.argv[2] + "/libcudnn.so.9", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  ln -sfn libcudnn.so.9 "$CUDA/lib/libcudnn.so"
fi

export CUDA_HOME=$CUDA                 # cudarc build.rs: link-search $CUDA_HOME/lib{,64}{,/stubs}
export PATH=$CUDA/bin:$PATH            # cudaforge + cudarc run `nvcc` (--version, --ptx, -c)
export CUDA_COMPUTE_CAP=90             # no nvidia-smi here; cudaforge turns 90 into sm_90a
export CUDARC_CUDA_VERSION=13000       # = cudarc feature cuda-13000 (else parsed from nvcc --version)
export CUDAFORGE_THREADS=$(nproc)      # parallel nvcc for candle-kernels (default used 1 of 2)
nvcc --version | tail -2

# ---- 2. stub libcuda.so (driver API; real one comes from the GPU box's driver) ----
# candle-core enables cudarc "dynamic-linking", so the link needs -lcuda. No wheel ships
# the toolkit's stub, so generate one exporting every cu* symbol cudarc can reference.
cargo fetch -q --manifest-path "$CRATE_DIR/Cargo.toml"
CUDARC_DIR=$(cargo metadata -q --format-version 1 ${CARGO_FLAGS:-} --manifest-path "$CRATE_DIR/Cargo.toml" |
  python3 -c 'import json,sys,os;print(next(os.path.dirname(p["manifest_path"]) for p in json.load(sys.stdin)["packages"] if p["name"]=="cudarc"))')
mkdir -p "$CUDA/lib/stubs"
grep -oE '^pub unsafe fn cu[A-Za-z0-9_]+' "$CUDARC_DIR/src/driver/sys/mod.rs" | awk '{print $4}' | sort -u |
  awk '{print "int " $1 "(void) { return 34; } /* CUDA_ERROR_STUB_LIBRARY */"}' > "$WORK/libcuda_stub.c"
gcc -shared -fPIC -O1 -Wl,-soname,libcuda.so.1 -o "$CUDA/lib/stubs/libcuda.so" "$WORK/libcuda_stub.c"

# ---- 3. build (MODE=check: only type-check every target, for CI; nothing is written) ----
if [ "${MODE:-build}" = check ]; then
  cargo check ${CARGO_FLAGS:-} --all-targets --manifest-path "$CRATE_DIR/Cargo.toml"
  echo "checked ${CARGO_FLAGS:-} in $(( $(date +%s) - T0 ))s"
  exit 0
fi
cargo build --release ${CARGO_FLAGS:-} --manifest-path "$CRATE_DIR/Cargo.toml" --bin "$BIN_NAME"

# ---- 3b. optionally the integration-test binary too (TEST_OUT=path) ----
if [ -n "${TEST_OUT:-}" ]; then
  TEST_EXE=$(cargo test --release ${CARGO_FLAGS:-} --manifest-path "$CRATE_DIR/Cargo.toml" \
      --test integration --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("target", {}).get("name") == "integration" and m.get("executable"):
        print(m["executable"])')
  [ -n "$TEST_EXE" ] || { echo "ERROR: no integration test binary"; exit 1; }
  mkdir -p "$(dirname "$TEST_OUT")"
  strip -o "$TEST_OUT" "$TEST_EXE"
  echo "built $TEST_OUT ($(du -h "$TEST_OUT" | cut -f1))"
fi

# ---- 4. strip + copy + report ----
mkdir -p "$(dirname "$OUT_FILE")"
strip -o "$OUT_FILE" "$CARGO_TARGET_DIR/release/$BIN_NAME"
echo "built $OUT_FILE ($(du -h "$OUT_FILE" | cut -f1)) in $(( $(date +%s) - T0 ))s"
readelf -d "$OUT_FILE" | grep NEEDED
# Sanity check without a GPU: all symbols resolve, run stops cleanly at cuInit (stub).
mkdir -p "$WORK/stubtest" && ln -sfn "$CUDA/lib/stubs/libcuda.so" "$WORK/stubtest/libcuda.so.1"
LD_LIBRARY_PATH=$CUDA/lib:$WORK/stubtest ldd -r "$OUT_FILE" 2>&1 | grep -q 'undefined symbol' &&
  { echo "ERROR: unresolved symbols"; exit 1; }
echo "symbols OK (against CUDA 13.0.2 libs + stub libcuda)"
