#!/usr/bin/env bash
# Formatting, lints and the whole Rust test suite (SQLite and PostgreSQL).
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked
