#!/usr/bin/env bash
# Runs every check and test of Engram: the one command a fresh machine needs.
# It starts or installs what the tests need itself (PostgreSQL, buf, grpcurl, ...): each
# scripts/checks/NN-*.sh installs its own tools under .tools/ and runs in order.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/postgres.sh
source scripts/lib/postgres.sh
ensure_postgres

only="${1:-}"
for check in scripts/checks/*.sh; do
  [[ -z "$only" || "$check" == *"$only"* ]] || continue
  echo "==> $check"
  bash "$check"
done
echo "==> all checks passed"
