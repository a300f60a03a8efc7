set -x
export PYTHONPATH=/tmp/site:$PWD
rm -rf /root/bw/12b
timeout 100 python3 -u -m benchmarks.towers --model 12b --compare mlx-vlm --runs 5 --audio-feature-dtype float32 model 2>&1 | tee $OUT/towers12b.txt | tail -30
timeout 440 python3 -u -m benchmarks.e2e --size 26b --direct --work /root/bw/26b --q-bits 4 --prompt 1024 --gen 128 --runs 3 --compare mlx-lm --followup 4000 --json $OUT/26b.json 2>&1 | tee $OUT/26b.txt
