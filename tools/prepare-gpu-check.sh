#!/usr/bin/env bash
# Prepares what tools/gpu-check.sh needs on the GPU machine (which has no Rust toolchain and no
# network), in the git-ignored folders .carry/ and .whl/ of the checkout:
#   .carry/infusion-repl.xz        the CUDA build of the binary (release, stripped, xz: the
#   .carry/integration.xz          carry limit is 64 MiB) and of the integration tests
#   .carry/infusion-repl-cudnn.xz  the same binary with cuDNN convolutions (feature `cudnn`)
#   .carry/diffusers_baseline.py   the PyTorch/diffusers baseline (../shared/bench)
#   .whl/diffusers-*.whl           diffusers 0.42.1, not installed on the GPU machine
#   .whl/peft-*.whl                peft 0.21.2, for the LoRA training step's baseline
# Then, with the device tool:  run(command="bash tools/gpu-check.sh", carry=[".carry", ".whl"])
# Both builds share one target folder (cargo keeps each feature set's artifacts apart), so after
# the first run only what changed is rebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
mkdir -p .carry .whl
rm -f .carry/*.gz .carry/*.xz
CARGO_FLAGS="--features cuda" TEST_OUT=.carry/integration bash tools/cuda-build.sh . infusion-repl .carry/infusion-repl
CARGO_FLAGS="--features cudnn" bash tools/cuda-build.sh . infusion-repl .carry/infusion-repl-cudnn
xz -9 -T0 -f .carry/infusion-repl .carry/integration .carry/infusion-repl-cudnn
cp "$SHARED/bench/diffusers_baseline.py" .carry/
ls .whl/diffusers-0.42.1-*.whl >/dev/null 2>&1 ||
  python3 -m pip download -q --no-deps diffusers==0.42.1 -d .whl
ls .whl/peft-0.21.2-*.whl >/dev/null 2>&1 ||   # the LoRA step of tools/diffusers_method_steps.py
  python3 -m pip download -q --no-deps peft==0.21.2 -d .whl
du -sh .carry .whl
