#!/bin/bash
# Second device call: the fixed trainer test and smoke study, with the paper-size benchmark beside them.
START=$(date +%s); el() { echo $(( $(date +%s) - START )); }
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || { echo INSTALL FAILED; exit 3; }
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
( timeout 290 python3 -m pytest -q -rA -m gpu tests/test_gpu.py -k smoke -p no:cacheprovider --basetemp=/tmp/pt2 > $OUT/gpu_check_smoke.log 2>&1
  grep -q "1 passed" $OUT/gpu_check_smoke.log || (cd /tmp/pt2 && tar czf $OUT/smoke_notebooks.tgz $(find . -name "*.ipynb" | head -20)) ) &
SMOKE=$!
echo "== trainer tests ($(el) s)"
timeout 90 python3 -m pytest -q -rA -m gpu tests/test_gpu.py -k "trainer or paper_size" -p no:cacheprovider --basetemp=/tmp/pt1 2>&1 | tee $OUT/gpu_check_trainer.log | grep -E "paper step|PASSED|FAILED|passed|failed|Error" | head -20
echo "== bench_paper fp32 + bf16 ($(el) s)"
timeout $(( 285 - $(el) )) python3 bench/bench_paper.py --markdown --row-timeout 60 2>&1 | tee $OUT/bench_paper.log | tail -22
echo "== waiting for the smoke study ($(el) s)"
wait $SMOKE
tail -15 $OUT/gpu_check_smoke.log
echo "done at $(el) s"
