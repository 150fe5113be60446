#!/usr/bin/env bash
# One prepared device session for the training work (prepared; not run yet: no device time was left) (run from the repo root on a GPU machine; $OUT collects results):
#  1. trains the bundled tiny model with the documented command (on the GPU) and exports it to $OUT/tiny;
#  2. times the same preset on 2 CPU cores (a stand-in for a quiet 2-core developer machine);
#  3. measures the trainer against a raw forward+backward on a ~0.6B-parameter JetMoE in bf16 on the GPU.
set -uo pipefail
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
log() { echo "== $*"; }
nvidia-smi -L; python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
log "tiny: GPU training of the bundled model"
SECONDS=0
python3 -m jetmoe.cli train --preset tiny --out-dir /tmp/tiny --export-dir "$OUT/tiny" --no-progress 2>&1 | grep -v Warning | tail -12
echo "tiny wall seconds: $SECONDS"
cp /tmp/tiny/metrics.jsonl "$OUT/metrics.jsonl"
log "tiny: 2 CPU cores, 30 steps"
OMP_NUM_THREADS=2 taskset -c 0,1 python3 -m jetmoe.cli train --preset tiny --device cpu --out-dir /tmp/tiny-cpu \
  --max-steps 30 --log-every 10 --val-every 1000 --no-progress --no-plots 2>&1 | tail -1
grep '"step": 30' /tmp/tiny-cpu/metrics.jsonl | head -1 | cut -c1-400
log "bench: 0.6B JetMoE, bf16, GPU"
python3 benchmarks/bench_training.py --steps 15 --set bf16=true --set seq_len=1024 --set batch_size=8 \
  --set model.vocab_size=8192 --set model.hidden_size=1024 --set model.num_hidden_layers=8 \
  --set model.num_key_value_heads=8 --set model.kv_channels=64 --set model.intermediate_size=2816 \
  --set model.num_local_experts=8 --set model.max_position_embeddings=1024 2>&1 | grep -v -i warn | tail -30
