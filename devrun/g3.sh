set -x
cat /root/parts/part-aa .devcarry/b/part-ab > /root/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/mlx_cuda_13-*.whl .devcarry/b/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv
timeout 200 python3 -u -m benchmarks.speculative --size e2b --q-bits 4 --prompt 1024 --gen 96 --runs 3 --k-max 4 2>&1 | tee $OUT/spec_e2b.txt | tail -4
timeout 330 python3 -u -m benchmarks.e2e --size 12b --work /root/bw/12b --q-bits 4 --prompt 1024 --gen 128 --runs 3 --compare mlx-vlm --json $OUT/12b.json 2>&1 | tee $OUT/12b.txt
df -h /root | tail -1
