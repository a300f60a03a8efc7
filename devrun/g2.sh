set -x
cat /root/parts/part-aa .devcarry/b/part-ab > /root/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/mlx_cuda_13-*.whl .devcarry/b/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.__version__)"
nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv
timeout 150 python3 -u -m benchmarks.speculative --size e4b --q-bits 4 --prompt 1024 --gen 96 --runs 3 2>&1 | tee $OUT/spec_e4b.txt
timeout 130 python3 -u -m benchmarks.speculative --size e2b --q-bits 4 --prompt 1024 --gen 96 --runs 3 2>&1 | tee $OUT/spec_e2b.txt
timeout 280 python3 -u -m benchmarks.e2e --size e2b --work /root/bw/e2b --q-bits 4 --prompt 1024 --gen 128 --runs 3 --compare mlx-lm --followup 4000 --json $OUT/e2b.json 2>&1 | tee $OUT/e2b.txt
df -h /root | tail -1
