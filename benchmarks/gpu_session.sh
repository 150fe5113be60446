#!/usr/bin/env bash
# The one prepared GPU run (device time is scarce): versions, a compat check with the device's own
# transformers, parity on CUDA, then the training/prefill benchmark for the 8b-layers geometry.
# Usage on the GPU machine, from the repository root, with the transformers 5.24 wheel in .whl/:
#   OUT=/some/dir bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
echo "== device transformers: import and generate"
PYTHONPATH=$PWD/src timeout 60 python3 -c "
import torch, jetmoe
m = jetmoe.JetMoeForCausalLM(jetmoe.JetMoeConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2, kv_channels=16, num_key_value_heads=2, intermediate_size=64, num_local_experts=4)).cuda()
print(m.generate(torch.randint(0, 64, (2, 5), device='cuda'), max_new_tokens=4, do_sample=False).shape)"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD/src
echo "== parity on CUDA (transformers 5.24)"
timeout 90 python3 benchmarks/gpu_parity.py
echo "== benchmark"
timeout 200 python3 benchmarks/bench_model.py --device cuda --configs 8b-layers --dtypes bf16 \
  --measures train,prefill --train-batch 8 --repeats 5 --no-memory --out "$OUT/RESULTS_gpu.md"
cat "$OUT/RESULTS_gpu.md"
