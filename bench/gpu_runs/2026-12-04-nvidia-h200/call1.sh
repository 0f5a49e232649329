#!/bin/bash
# One device call: install the carried wheels, then make gpu-check's tests and the paper-size benchmark.
START=$(date +%s); el() { echo $(( $(date +%s) - START )); }
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || { echo INSTALL FAILED; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
echo "install done at $(el) s"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee $OUT/gpu.txt
nproc | tee -a $OUT/gpu.txt
python3 -c "
import torch, diffusers, timm, accelerate, torchmetrics, papermill, ipykernel, zarr, hdlib
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), torch.cuda.get_device_name())
print('diffusers', diffusers.__version__, 'timm', timm.__version__, 'accelerate', accelerate.__version__, 'torchmetrics', torchmetrics.__version__, 'papermill', papermill.__version__)
" 2>&1 | tee -a $OUT/gpu.txt || { echo IMPORT FAILED; exit 4; }
echo "== gpu-check without the smoke study ($(el) s)"
timeout 200 python3 -m pytest -q -rA -m gpu tests/test_gpu.py -k "not smoke" -p no:cacheprovider --basetemp=/tmp/pt1 2>&1 | tee $OUT/gpu_check.log | tail -40
echo "== gpu-check: the smoke study on cuda ($(el) s)"
timeout 200 python3 -m pytest -q -rA -m gpu tests/test_gpu.py -k smoke -p no:cacheprovider --basetemp=/tmp/pt2 2>&1 | tee $OUT/gpu_check_smoke.log | tail -25
if ! grep -q "1 passed" $OUT/gpu_check_smoke.log; then (cd /tmp/pt2 && tar czf $OUT/smoke_notebooks.tgz $(find . -name "*.ipynb" -newer /tmp/site | head -20)) 2>/dev/null; fi
echo "== bench_paper fp32 + bf16 ($(el) s)"
timeout 170 python3 bench/bench_paper.py --markdown --row-timeout 60 2>&1 | tee $OUT/bench_paper.log | tail -30
if [ $(el) -lt 430 ]; then
  echo "== bench_paper bf16 --compile --channels-last ($(el) s)"
  timeout $(( 540 - $(el) )) python3 bench/bench_paper.py --markdown --precision bf16 --compile --channels-last --row-timeout 100 2>&1 | tee $OUT/bench_paper_compile.log | tail -20
fi
echo "done at $(el) s"
