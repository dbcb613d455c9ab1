#!/usr/bin/env bash
# The prepared check of alignkit's GPU paths, for a machine with a CUDA GPU (under 10 minutes
# on one H100): the CUDA tests, the lean forwards against each architecture's own forward on
# the GPU in float32 and bf16, and the default pipeline's smoke budget on backend=single_gpu.
# Usage: scripts/gpu_check.sh [OUT_DIR]   (needs .venv from `make setup-dev`)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-outputs/gpu_check}"
mkdir -p "$OUT"
PY=.venv/bin/python
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
# 1. The tests that run only on a GPU (single GPU; NCCL ones need 2 GPUs and skip otherwise).
$PY -m pytest -q tests/test_backends.py -k "cuda or gpu or nccl" 2>&1 | tee "$OUT/cuda_tests.txt"
# 2. Lean forwards on CUDA: sampling log-probs against the model's forward, every architecture.
$PY - <<'PY' 2>&1 | tee "$OUT/lean_cuda.txt"
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from alignkit.generation import generate
from alignkit.models import sequence_logprobs
from alignkit.tiny_models import ARCHITECTURES, TinyArchSpec, build_tiny_causal_lm

corpus = ["the quick brown fox jumps over the lazy dog"] * 50
for arch in ARCHITECTURES:
    path = build_tiny_causal_lm(Path(tempfile.mkdtemp()) / arch, corpus, TinyArchSpec(arch=arch))
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
        ids = torch.randint(3, 100, (8, 9), device="cuda")
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        gen = torch.Generator(device="cuda").manual_seed(0)
        out = generate(model, ids, mask, max_new_tokens=8, eos_token_id=[-1], pad_token_id=0,
                       generator=gen)
        seq = torch.cat([ids, out.response_ids], 1)
        full = torch.cat([mask, out.response_mask], 1)
        ref = sequence_logprobs(model, seq, full, ids.shape[1])
        diff = (out.logprobs - ref).abs().max().item()
        print(f"{arch:9s} {str(dtype):15s} sampling vs forward log-prob max diff {diff:.2e}")
        assert diff < tol, (arch, dtype, diff)
print("lean CUDA check passed")
PY
# 3. The whole pipeline at the smoke budget on one GPU.
.venv/bin/alignkit experiment=smoke logger=none backend=single_gpu run_dir="$OUT/smoke_single_gpu" \
  2>&1 | tail -25 | tee "$OUT/smoke_single_gpu.txt"
echo "GPU check passed; logs in $OUT"
