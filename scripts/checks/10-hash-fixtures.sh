#!/usr/bin/env bash
# The Unicode tables and hash fixtures are generated from CPython 3.11 running the
# reference design's own functions: regenerate them and fail if they differ from git.
set -euo pipefail
cd "$(dirname "$0")/../.."
if ! python3 -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "skip: fixtures are pinned to CPython 3.11 (this is $(python3 --version)); the committed ones are tested below"
  exit 0
fi
python3 scripts/gen_python_unicode_tables.py
python3 scripts/gen_hash_fixtures.py
git diff --exit-code -- crates/engram-domain/src/text/python_unicode.rs crates/engram-domain/tests/fixtures/python_hashes.jsonl
echo "hash fixtures and Unicode tables match CPython 3.11"
