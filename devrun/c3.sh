export PYTHONPATH=/tmp/site:$PWD
timeout 250 python3 -m benchmarks.speculative --size e4b --q-bits 4 --prompt 1024 --gen 128 --runs 3 2>&1 | tee $OUT/spec_e4b.txt
timeout 250 python3 -m benchmarks.speculative --size e2b --q-bits 4 --prompt 1024 --gen 128 --runs 3 2>&1 | tee $OUT/spec_e2b.txt
