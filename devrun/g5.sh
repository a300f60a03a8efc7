set -x
cat /root/parts/part-aa .devcarry/b/part-ab > /root/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/mlx_cuda_13-*.whl .devcarry/b/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv
df -h /root | tail -1
timeout 60 python3 -u -m benchmarks.prefill_memory --size e4b --tokens 1059 --q-bits 4 2>&1 | tee $OUT/pm_e4b.txt | tail -25
timeout 470 python3 -u -m benchmarks.e2e --size e4b --work /root/bw/e4b --q-bits 4 --prompt 1024 --gen 128 --runs 3 --compare mlx-lm --followup 4000 --prefill-chunk 2048,512 --json $OUT/e4b.json 2>&1 | tee $OUT/e4b.txt | tail -30
df -h /root | tail -1
