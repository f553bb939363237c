#!/usr/bin/env bash
# Builds bench/pytorch_anchor.cc ON THE GPU HOST (not by Bazel: it needs the installed PyTorch),
# with g++ against torch's own headers and libraries (libc10_cuda.so, libc10.so) and the CUDA
# runtime (the library from torch's nvidia wheels first, so it is the one torch loads; else the
# toolkit's).
#
#   bench/build_pytorch_anchor.sh [OUTPUT]     (default OUTPUT: gpu_bundle/pytorch_anchor)
#
# Environment: PYTHON (default python3), CXX (default g++), CXX_STD (default c++20, which torch
# 2.13+ requires and earlier versions accept), CUDA_HOME / CUDA_PATH (default /usr/local/cuda).
set -euo pipefail
cd "$(dirname "$0")/.."
output="${1:-gpu_bundle/pytorch_anchor}"
python="${PYTHON:-python3}"
cxx="${CXX:-g++}"

torch_dir="$("$python" -c 'import torch,os;print(os.path.dirname(torch.__file__))')"
site_packages="$(dirname "$torch_dir")"
# libc10 is built with one libstdc++ string ABI; the anchor must use the same.
cxx11_abi="$("$python" -c 'import torch;print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"

# The CUDA runtime header and library.
cuda="${CUDA_HOME:-${CUDA_PATH:-/usr/local/cuda}}"
cudart_lib="$(find "$site_packages/nvidia" -name 'libcudart.so*' 2>/dev/null | sort | head -n 1 || true)"
if [ -z "$cudart_lib" ] && [ -f "$cuda/lib64/libcudart.so" ]; then
  cudart_lib="$cuda/lib64/libcudart.so"
fi
# Headers: the toolkit's when there is one (complete), else the wheels'.
if [ -f "$cuda/include/cuda_runtime_api.h" ]; then
  cudart_header="$cuda/include/cuda_runtime_api.h"
else
  cudart_header="$(find "$site_packages/nvidia" -name cuda_runtime_api.h 2>/dev/null | head -n 1 || true)"
fi
if [ -z "$cudart_lib" ] || [ -z "$cudart_header" ]; then
  echo "build_pytorch_anchor: no CUDA runtime found in torch's nvidia wheels or $cuda" >&2
  exit 1
fi

mkdir -p "$(dirname "$output")"
"$cxx" -std="${CXX_STD:-c++20}" -O2 -DNDEBUG -D_GLIBCXX_USE_CXX11_ABI="$cxx11_abi" \
  -I. -I"$torch_dir/include" -I"$(dirname "$cudart_header")" \
  bench/pytorch_anchor.cc -o "$output" \
  -L"$torch_dir/lib" -lc10_cuda -lc10 "$cudart_lib" \
  -Wl,-rpath,"$torch_dir/lib" -Wl,-rpath,"$(dirname "$cudart_lib")" -pthread
echo "built $output (torch at $torch_dir, CUDA runtime $cudart_lib)"
