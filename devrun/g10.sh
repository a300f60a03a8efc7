set -x
export PYTHONPATH=/tmp/site:$PWD
rm -rf /root/bw/e4b
timeout 300 python3 -u -m benchmarks.e2e --size 12b --work /root/bw/12b --q-bits 4 --prompt 1024 --gen 128 --runs 3 --compare mlx-vlm --quantized-prefill-too --json $OUT/12b.json 2>&1 | tee $OUT/12b.txt | grep -v "^# run"
timeout 120 python3 -u -m benchmarks.parts /root/bw/12b/ours-4bit --tokens 1059 --parts ab 2>&1 | tee $OUT/parts_12b.txt
