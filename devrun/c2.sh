cat /root/parts/part-aa .devcarry/b/part-ab > /root/mlx_cuda_13-0.32.4-py3-none-manylinux_2_35_x86_64.whl && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /root/mlx_cuda_13-*.whl .devcarry/b/*.whl
export PYTHONPATH=/tmp/site:$PWD
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.__version__)"
nvidia-smi --query-gpu=name,memory.total --format=csv
timeout 380 python3 -m benchmarks.e2e --size e4b --hf-path /root/bw/e4b/hf --work /root/bw/e4b --q-bits 4 --prompt 1024 --gen 128 --runs 3 --compare mlx-lm,mlx-vlm --followup 4000 --breakdown --json $OUT/e4b.json 2>&1 | tee $OUT/e4b.txt
timeout 150 python3 -m benchmarks.parts /root/bw/e4b/ours-4bit /root/bw/e4b/mlx-lm-4bit --tokens 1059 --parts prefill,decode,ab 2>&1 | tee $OUT/prof_e4b.txt
