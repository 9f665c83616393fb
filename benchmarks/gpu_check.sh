#!/usr/bin/env bash
# The CUDA checks, prepared to run once on a GPU machine (a few minutes; never in CI):
#   bash benchmarks/gpu_check.sh > gpu_check.log 2>&1
# 1. the device-parametrized layer, selection, seeding and training tests (`device` fixture:
#    cpu and cuda), 2. a base regenerated on CUDA fingerprinted against the CPU one,
# 3. the training step popup/dense under bf16 autocast and its peak memory, 4. loading.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())"
python -m pytest -q -p no:cacheprovider tests/test_layers.py tests/test_selection.py \
  tests/test_seeding.py -k "device"
python - <<'EOF'
import timm
import torch

from popup_adapter import get_popup_model

cpu = get_popup_model(timm.create_model("resnet50"), k=0.3)
cuda = get_popup_model(timm.create_model("resnet50").cuda(), k=0.3)
assert next(cuda.parameters()).is_cuda
print("resnet50 base fingerprint, cpu == cuda:", cpu.base_fingerprint == cuda.base_fingerprint)
assert cpu.base_fingerprint == cuda.base_fingerprint
EOF
python benchmarks/train_step.py --device cuda --bf16 --models resnet50,vit,bert --rounds 5
python benchmarks/train_step.py --device cuda --bf16 --models resnet50,vit,bert --memory
python benchmarks/load.py --models resnet50 --rounds 3
