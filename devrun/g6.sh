set -x
export PYTHONPATH=/tmp/site:$PWD
timeout 100 python3 -u -m benchmarks.parts /root/bw/e4b/ours-4bit /root/bw/e4b/mlx-lm-4bit --tokens 1059 --parts decode 2>&1 | tee $OUT/parts_e4b.txt
rm -rf /root/bw/e4b

timeout 480 python3 -u -m benchmarks.e2e --size 12b --work /root/bw/12b --q-bits 4 --prompt 1024 --gen 128 --runs 3 --compare mlx-vlm --prefill-chunk 2048,1024,512 --json $OUT/12b.json 2>&1 | tee $OUT/12b.txt | tail -30
