export PYTHONPATH=/tmp/site:$PWD
rm -rf /root/bw/e4b/hf /root/bw/e2b/hf
df -h /root | tail -1
timeout 560 python3 -c "
from pathlib import Path
from benchmarks.e2e import make_checkpoint
make_checkpoint('12b', Path('/root/bw/12b/hf'))
"
du -sh /root/bw/12b/hf
