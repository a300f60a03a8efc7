set -x
mkdir -p /root/parts && cp .devcarry/a/part-aa /root/parts/ && ls -la /root/parts
export PYTHONPATH=$PWD
nproc; free -g; df -h /root | tail -1
python3 - <<'PY'
from pathlib import Path
from benchmarks.e2e import make_checkpoint
make_checkpoint("e4b", Path("/root/bw/e4b/hf"))
PY
du -sh /root/bw/*/hf
