#!/usr/bin/env bash
# The GPU checks of issue 4, as one run on the lent GPU machine (the device tool):
#   the CUDA tests of tests/test_detect.py, then bench/detect.py's GPU figures (ResNet-50 FPN
#   at 800 px, fp32 and bf16, batch 1..32; forward vs postprocess at 512 px).
# That machine has PyTorch, numpy, PyYAML and pytest, but not pydantic or affine: download
# their wheels for CPython 3.12 into .whl (listed in .git/info/exclude) and carry .whl:
#   pydantic pydantic-core annotated-types typing-inspection affine
# Run from the repository root: bash bench/gpu_check.sh   (about 3 minutes on an H200)
set -euo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__)"
# -c /dev/null: pyproject's warning filters name rasterio's classes, and rasterio is not there.
python3 -m pytest -q -p no:cacheprovider -c /dev/null --rootdir . tests/test_detect.py -k cuda
python3 bench/detect.py --gpu-only
