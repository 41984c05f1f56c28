#!/usr/bin/env bash
# Installs the peers that bench.peers measures kvstore against, each in its own environment:
#
#   bash scripts/peers-env.sh            # idempotent; seconds once everything is there
#   bash scripts/peers-env.sh redis      # only some of: redis mooncake lmcache
#   .venv/bin/python -m bench.peers --json bench-results/peers.json
#
# - redis:    Debian's redis-server (apt), and .venv-peers-redis with `redis` + `hiredis` (PyPI).
# - mooncake: Debian's libibverbs1 (needed even for TCP), and .venv-peers-mooncake with
#             mooncake-transfer-engine-non-cuda==0.3.13.post1 (its `mooncake_master` and the
#             `mooncake.store` client).
# - lmcache:  .venv-peers-lmcache with lmcache==0.5.6 on torch==2.13.0 (the CPU wheel; a bare
#             torch would pull a multi-GB CUDA build).
#
# Each environment also gets numpy (the benchmark's worker processes use it). A peer that fails
# to install does not stop the others: the script says which failed and exits non-zero, and
# bench.peers reports that peer as not installed, with the reason, instead of measuring it.
# Every environment that installed gets a stamp file; the stamp and an import check make a
# second run a no-op. About 1 min (redis), 1 min (mooncake), 3-5 min (lmcache) the first time.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
PYTHON="${PYTHON:-python3}"
MOONCAKE_PIN="mooncake-transfer-engine-non-cuda==0.3.13.post1"
LMCACHE_PIN="lmcache==0.5.6"
TORCH_PIN="torch==2.13.0"
PEERS=("$@")
[[ ${#PEERS[@]} -eq 0 ]] && PEERS=(redis mooncake lmcache)

log() { echo "[peers-env] $*" >&2; }
pip_() {  # pip in venv $1, resolver notes about absent local index folders filtered out
    local venv="$1"; shift
    "$venv/bin/python" -m pip "$@" 2>&1 | { grep -v -e "is ignored: it is neither a file nor a directory" || true; } >&2
    return "${PIPESTATUS[0]}"
}
APT_UPDATED=0
apt_install() {  # Debian packages, only those missing
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [[ ${#missing[@]} -eq 0 ]] && return 0
    if ! command -v apt-get >/dev/null; then
        log "no apt-get here: cannot install ${missing[*]}"; return 1
    fi
    local sudo=""
    [[ "$(id -u)" -ne 0 ]] && sudo="sudo -n"
    if [[ $APT_UPDATED -eq 0 ]]; then
        $sudo apt-get update -qq >&2 || return 1
        APT_UPDATED=1
    fi
    log "apt-get install ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}
make_venv() {  # make_venv DIR: creates it with an upgraded pip if absent
    local venv="$1"
    if [[ ! -x "$venv/bin/python" ]]; then
        log "creating $venv"
        "$PYTHON" -m venv "$venv" || return 1
        pip_ "$venv" install -q --upgrade pip || return 1
    fi
}
ready() {  # ready VENV CHECK-SCRIPT: the stamp is there and the check passes
    [[ -f "$1/.kvstore-peer-installed" ]] && "$1/bin/python" -c "$2" >/dev/null 2>&1
}

install_redis() {
    local venv="$ROOT/.venv-peers-redis" check="import redis, hiredis, numpy"
    apt_install redis-server || return 1
    # Debian's package starts a system-wide server on 6379; the benchmark starts its own.
    if command -v systemctl >/dev/null && systemctl is-active -q redis-server 2>/dev/null; then
        log "note: a system redis-server is running (the benchmark does not use it)"
    fi
    ready "$venv" "$check" && { log "redis up to date"; return 0; }
    make_venv "$venv" || return 1
    pip_ "$venv" install -q redis hiredis numpy || return 1
    "$venv/bin/python" -c "$check" || return 1
    touch "$venv/.kvstore-peer-installed"
}

install_mooncake() {
    local venv="$ROOT/.venv-peers-mooncake"
    local check="import mooncake.store, numpy, shutil, os, sys; assert os.path.exists(os.path.join(os.path.dirname(sys.executable), 'mooncake_master'))"
    apt_install libibverbs1 || return 1
    ready "$venv" "$check" && { log "mooncake up to date"; return 0; }
    make_venv "$venv" || return 1
    pip_ "$venv" install -q "$MOONCAKE_PIN" numpy || return 1
    "$venv/bin/python" -c "$check" || return 1
    touch "$venv/.kvstore-peer-installed"
}

install_lmcache() {
    local venv="$ROOT/.venv-peers-lmcache"
    local check="import importlib.metadata as md, torch, numpy, lmcache.v1.server; assert md.version('lmcache') == '0.5.6'; assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__"
    ready "$venv" "$check" && { log "lmcache up to date"; return 0; }
    make_venv "$venv" || return 1
    pip_ "$venv" install -q "$TORCH_PIN" || return 1
    local torch_before
    torch_before="$("$venv/bin/python" -c 'import torch; print(torch.__version__)')"
    pip_ "$venv" install -q "$LMCACHE_PIN" "torch==$torch_before" numpy || return 1
    "$venv/bin/python" -c "$check" || return 1
    touch "$venv/.kvstore-peer-installed"
}

failed=()
for peer in "${PEERS[@]}"; do
    case "$peer" in
        redis|mooncake|lmcache) ;;
        *) log "unknown peer $peer (known: redis mooncake lmcache)"; failed+=("$peer"); continue ;;
    esac
    log "$peer: checking / installing"
    if "install_$peer"; then
        log "$peer: ready"
    else
        log "$peer: FAILED to install"
        failed+=("$peer")
    fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
    log "not installed: ${failed[*]}"
    exit 1
fi
log "all ready: ${PEERS[*]}"
