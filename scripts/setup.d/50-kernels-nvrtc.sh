# NVRTC (CUDA's runtime compiler) with CUDA 13's device headers, into the project venv, so that a machine
# without a GPU compiles every generated CUDA kernel body in evaluator/tests/test_kernels_nvrtc.py.
# The same compiler MLX's CUDA backend uses for mx.fast.cuda_kernel; ~95 MB of wheels; Linux x86-64 only.
set -euo pipefail
[ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ] || { echo "nvrtc: not Linux x86-64, skipped"; exit 0; }
PKGS=(nvidia-cuda-nvrtc==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-crt==13.0.88)
if ! .venv/bin/python -c "
import glob, os, nvidia
base = os.path.join(list(nvidia.__path__)[0], 'cu13')
assert glob.glob(os.path.join(base, 'lib', 'libnvrtc.so.*')) and os.path.isfile(os.path.join(base, 'include', 'crt', 'mma.h'))
" 2>/dev/null; then
  .venv/bin/pip install -q "${PKGS[@]}"
fi
