#!/usr/bin/env bash
# One prepared run on an accelerator (H100/H200): the bf16 VGG16 (D) training step at batch 64,
# 128 and 256 with MFU (bench/train_step.py; peak from its table: H100/H200 bf16 dense 989
# TFLOP/s), dense vs 150-crop evaluation of D at the paper's test scales (bench/evaluate.py), and,
# only where TensorFlow is installed, the loop/step ratio (bench/train_loop.py). The step and
# evaluation benches import neither TensorFlow nor TFDS. Figures go to $OUT (default ./bench_out).
#
#     bash bench/gpu.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench_out}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
for batch in 64 128 256; do
  timeout 300 python bench/train_step.py --config=experiments/vgg16.py --batch="$batch" \
    --config.model.dtype=bfloat16 --steps=10 --warmup=2 2>&1 | tail -2 | tee -a "$OUT/train_step.txt"
done
timeout 300 python bench/evaluate.py --width=1 --fc_width=4096 --batch=16 --images=64 \
  --dtype=bfloat16 2>&1 | tail -2 | tee "$OUT/evaluate.txt"
if python -c "import tensorflow" 2>/dev/null; then
  timeout 600 python bench/train_loop.py --config=experiments/vgg16.py \
    --config.model.dtype=bfloat16 --config.input.dataset=builtin \
    --config.input.builtin_size=small --config.input.data_dir="$OUT/data" \
    --config.input.batch_size=128 --config.model.num_classes=10 \
    --config.init_from.mode=none --config.input.train_scale_min=256 \
    --config.input.train_scale_max=256 --config.evals.single_scale=256 \
    --image_sizes=imagenet --rounds=2 2>&1 | tail -4 | tee "$OUT/train_loop.txt"
else
  echo "TensorFlow not installed: loop/step not measured" | tee "$OUT/train_loop.txt"
fi
