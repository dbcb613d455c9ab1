#!/usr/bin/env bash
# The prepared check of alignkit's GPU paths, for a machine with a CUDA GPU (a few minutes on
# one H100; every step has its own time limit, 10 minutes in all for the steps a single GPU
# runs): the CUDA tests, device discipline (the
# sampling generator on the GPU, float32 LM heads under bf16 autocast, the rollout / update
# ratio at the first minibatch), the lean forwards against each architecture's own forward on
# the GPU in float32, bf16 weights and bf16 autocast, the default pipeline's smoke budget
# on backend=single_gpu, FSDP over NCCL with 2+ GPUs and vLLM rollouts when .venv-vllm
# exists. Ends with a pass/fail table; exits 1 if any step failed.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]   (needs .venv from `make setup-dev`)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-outputs/gpu_check}"
mkdir -p "$OUT"
PY=.venv/bin/python
export WANDB_MODE=offline WANDB_SILENT=true
ROWS=()
FAILED=0

# run_step NAME LIMIT_S CMD...: run CMD under a time limit, log to $OUT/NAME.txt, add a row.
run_step() {
  local name=$1 limit=$2 start=$SECONDS rc status
  shift 2
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.txt" 2>&1
  rc=$?
  case $rc in
    0) status=PASS ;;
    124 | 137) status=TIMEOUT ;;
    *) status="FAIL (rc $rc)" ;;
  esac
  if [ "$rc" -ne 0 ]; then
    FAILED=1
    tail -25 "$OUT/$name.txt"
  fi
  ROWS+=("$(printf '%-20s %-14s %5ss' "$name" "$status" $((SECONDS - start)))")
}

if ! $PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print(torch.cuda.get_device_name(0), 'torch', torch.__version__)"; then
  echo "GPU check: no CUDA device visible to $PY" >&2
  exit 1
fi

# 1. The CUDA tests of the backends (single GPU; NCCL ones need 2 GPUs and skip otherwise).
run_step cuda_tests 150 $PY -m pytest -q -rs -p no:cacheprovider tests/test_backends.py \
  -k "cuda or gpu or nccl"

# 2. Device discipline: CPU tests plus the CUDA ones (-s prints the measured ratios).
run_step device_discipline 90 $PY -m pytest -q -s -rs -p no:cacheprovider \
  tests/test_device_discipline.py

# 3. Lean forwards on CUDA: sampling log-probs against the model's forward, every
#    architecture, with float32 weights, bf16 weights and float32 weights under bf16 autocast.
cat >"$OUT/lean_cuda.py" <<'PY'
import contextlib
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from alignkit.models.generation import generate
from alignkit.models import sequence_logprobs
from alignkit.models.tiny import ARCHITECTURES, TinyArchSpec, build_tiny_causal_lm

corpus = ["the quick brown fox jumps over the lazy dog"] * 50
modes = (
    ("fp32", torch.float32, False, 1e-4),
    ("bf16 weights", torch.bfloat16, False, 5e-2),
    ("bf16 autocast", torch.float32, True, 5e-2),
)
for arch in ARCHITECTURES:
    path = build_tiny_causal_lm(Path(tempfile.mkdtemp()) / arch, corpus, TinyArchSpec(arch=arch))
    for name, dtype, autocast, tol in modes:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).cuda().eval()
        ids = torch.randint(3, 100, (8, 9), device="cuda")
        mask = torch.ones_like(ids)
        mask[0, :4] = 0
        gen = torch.Generator(device="cuda").manual_seed(0)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with ctx:
            out = generate(model, ids, mask, max_new_tokens=8, eos_token_id=[-1],
                           pad_token_id=0, generator=gen)
            seq = torch.cat([ids, out.response_ids], 1)
            full = torch.cat([mask, out.response_mask], 1)
            ref = sequence_logprobs(model, seq, full, ids.shape[1])
        assert out.logprobs.dtype == torch.float32 and ref.dtype == torch.float32
        diff = (out.logprobs - ref).abs().max().item()
        print(f"{arch:9s} {name:14s} sampling vs forward log-prob max diff {diff:.2e}")
        assert diff < tol, (arch, name, diff)
print("lean CUDA check passed")
PY
run_step lean_cuda 90 $PY "$OUT/lean_cuda.py"

# 4. The whole pipeline at the smoke budget on one GPU.
run_step smoke_single_gpu 120 .venv/bin/alignkit experiment=smoke logger=none \
  backend=single_gpu run_dir="$OUT/smoke_single_gpu"

# 5. Data-parallel FSDP over NCCL on 2 GPUs (when there are 2): the smoke RL run, bf16.
if [ "$($PY -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
  run_step fsdp_nccl_2gpu 120 $PY -m torch.distributed.run --standalone --nproc_per_node=2 \
    -m alignkit.cli experiment=smoke logger=none backend=fsdp algorithm=grpo \
    run_dir="$OUT/fsdp_nccl_2gpu"
fi

# 6. vLLM rollouts on the GPU, when the vLLM environment exists (scripts/setup_vllm_env.sh
#    installs vLLM's CUDA build on a GPU machine): the smoke pipeline with rollout=vllm.
if [ -x .venv-vllm/bin/python ] && .venv-vllm/bin/python -c "import vllm" >/dev/null 2>&1; then
  run_step vllm_single_gpu 150 .venv-vllm/bin/alignkit experiment=smoke logger=none \
    backend=single_gpu algorithm=grpo rollout=vllm model.tiny.arch=llama \
    run_dir="$OUT/vllm_single_gpu"
fi

echo
echo "GPU check ($(date -u +%Y-%m-%dT%H:%MZ)); logs in $OUT"
printf '%-20s %-14s %6s\n' step result time
for row in "${ROWS[@]}"; do echo "$row"; done
grep -h "first-minibatch" "$OUT/device_discipline.txt" 2>/dev/null || true
if [ "$FAILED" -ne 0 ]; then
  echo "GPU check FAILED"
  exit 1
fi
echo "GPU check passed"
