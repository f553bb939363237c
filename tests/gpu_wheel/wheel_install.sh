#!/usr/bin/env bash
# The wheel on the GPU host (run from the bundle by run_gpu_tests.sh): a fresh virtual
# environment that sees the system's packages (torch), `pip install --no-index` of the bundle's
# wheel, then the console command: `tidepool --version`, `tidepool where`, and `tidepool run
# --stats` of a PyTorch program with PyTorch's caching off, which the interposer must serve.
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
wheel="$(ls "$here"/wheel/tidepool-*.whl 2>/dev/null | head -1)"
if [ -z "$wheel" ]; then
  echo "FAIL no wheel in $here/wheel (tools/gather_gpu_tests.sh puts it there)"
  exit 1
fi
venv="$(mktemp -d)/venv"
trap 'rm -rf "$(dirname "$venv")"' EXIT
python3 -m venv --system-site-packages "$venv" || { echo "FAIL python3 -m venv"; exit 1; }
# Where python3 is itself a virtual environment's (as on the GPU host), --system-site-packages
# reaches the base interpreter's packages, not that environment's: a .pth file adds the folder
# torch is in, after the new environment's own site-packages (so the wheel's tidepool wins).
torch_site="$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')" ||
  { echo "FAIL python3 cannot import torch"; exit 1; }
venv_site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
echo "$torch_site" >"$venv_site/zz_host_packages.pth"
# The bundle's own package must not shadow the installed one.
unset PYTHONPATH TIDEPOOL_LIBRARY
"$venv/bin/pip" install --no-index --no-deps "$wheel" >/dev/null ||
  { echo "FAIL pip install --no-index $wheel"; exit 1; }
"$venv/bin/tidepool" --version || { echo "FAIL tidepool --version"; exit 1; }
"$venv/bin/tidepool" where || { echo "FAIL tidepool where"; exit 1; }
output="$(PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$venv/bin/tidepool" run --stats -- "$venv/bin/python" -c "
import torch
x = torch.randn(2048, 2048, device='cuda')
y = (x @ x).relu()
print('result', float(y.sum()) > 0)
" 2>&1)"
status=$?
echo "$output" | cut -c1-200
if [ $status -ne 0 ] || ! grep -q "result True" <<<"$output" ||
    ! grep -q "tidepool: device 0: [1-9][0-9]* allocations served by tidepool" <<<"$output"; then
  echo "FAIL tidepool run under the installed wheel"
  exit 1
fi
echo "PASS the wheel installs offline and its tidepool run serves PyTorch"
