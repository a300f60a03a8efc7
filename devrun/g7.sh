set -x
export PYTHONPATH=/tmp/site:$PWD
timeout 240 python3 -u -m benchmarks.parts /root/bw/12b/ours-4bit --tokens 1059 --parts prefill,layers,decode,ab 2>&1 | tee $OUT/parts12b.txt
rm -rf /root/bw/12b
timeout 170 python3 -u -m benchmarks.speculative --size e2b --q-bits 4 --prompt 1024 --gen 96 --runs 3 2>&1 | tee $OUT/spec_e2b.txt | tail -40
timeout 200 python3 -u -m benchmarks.speculative --size e4b --q-bits 4 --prompt 1024 --gen 96 --runs 3 2>&1 | tee $OUT/spec_e4b.txt | tail -40
