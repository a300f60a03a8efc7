export PYTHONPATH=/tmp/site:$PWD
python3 -m benchmarks.e2e --size 12b --hf-path /root/bw/12b/hf --work /root/bw/12b --q-bits 4 --prompt 1024 --gen 128 --runs 3 --compare mlx-vlm,mlx-lm --breakdown --json $OUT/12b.json 2>&1 | tee $OUT/12b.txt
