#!/usr/bin/env bash
# Installs the OTLP test receiver's Python packages (grpcio, opentelemetry-proto) into
# .tools/otlp; the telemetry test (run by 90-cargo) starts the receiver from there.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=.tools/otlp
if ! "$venv/bin/python" -c 'import grpc, opentelemetry.proto' 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check grpcio==1.85.1 'opentelemetry-proto>=1.27,<2'
fi
echo "OTLP receiver packages ready in $venv"
