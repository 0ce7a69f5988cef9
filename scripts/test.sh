#!/usr/bin/env bash
# Runs every test: builds the guest images (cached), checks formatting and
# lints, then the unit tests and the integration tests that boot guests on
# /dev/kvm. Tests this host cannot run are listed as ignored, with why.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v cargo >/dev/null || {
	echo "test: cargo is not installed; install Rust with rustup (https://rustup.rs)" >&2
	exit 1
}
bash kernel-images/build.sh
cargo fmt --all -- --check
cargo clippy --quiet --workspace --all-targets -- -D warnings
cargo test --workspace
