mkdir -p /root/parts && cp .devcarry/a/part-aa /root/parts/ && ls -la /root/parts && nvidia-smi --query-gpu=name,memory.total --format=csv
