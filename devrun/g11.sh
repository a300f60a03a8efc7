set -x
cat /root/parts/part-aa .devcarry/b/part-ab > /root/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/mlx_cuda_13-*.whl .devcarry/b/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 110 python3 -u -m benchmarks.dense_prefill --size 12b --layers 12 --tokens 1059 --runs 5 2>&1 | tee $OUT/dp_12b.txt
timeout 80 python3 -u -m benchmarks.dense_prefill --size e4b --layers 12 --tokens 1059 --runs 5 2>&1 | tee $OUT/dp_e4b.txt
