#!/usr/bin/env bash
# ToolConfigService end to end, including `secretsmanager://` API keys against a local moto
# server: installs moto (PyPI) into .tools/moto, where the test finds it (the 90-cargo check
# runs the same test again and finds it there too).
set -euo pipefail
cd "$(dirname "$0")/../.."
MOTO_VERSION=5.2.5
BOTO3_VERSION=1.44.5
venv=.tools/moto
if ! "$venv/bin/python" -c "import moto, sys; sys.exit(moto.__version__ != '$MOTO_VERSION')" 2>/dev/null \
  || [[ ! -x "$venv/bin/moto_server" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "moto[server]==$MOTO_VERSION" "boto3==$BOTO3_VERSION"
fi
ENGRAM_TEST_MOTO_SERVER="$PWD/$venv/bin/moto_server" \
  cargo test -p engram-server --test toolconfig --locked
echo "toolconfig: clean"
