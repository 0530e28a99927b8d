#!/usr/bin/env bash
# buf lint (STANDARD with the AIP exceptions in buf.yaml) over proto/.
set -euo pipefail
cd "$(dirname "$0")/../.."
BUF_VERSION=1.75.0
buf=.tools/buf/node_modules/.bin/buf
if [[ ! -x "$buf" ]] || [[ "$("$buf" --version)" != "$BUF_VERSION" ]]; then
  npm install --silent --no-audit --no-fund --prefix .tools/buf "@bufbuild/buf@$BUF_VERSION" >/dev/null
fi
"$buf" lint
echo "buf lint: clean"
