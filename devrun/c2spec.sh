cat /root/parts/part-aa .devcarry/b/part-ab > /root/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/mlx_cuda_13-*.whl .devcarry/b/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.__version__)"
timeout 280 python3 -m benchmarks.speculative --size e4b --q-bits 4 --prompt 1024 --gen 96 --runs 3 2>&1 | tee $OUT/spec_e4b.txt
