#!/usr/bin/env bash
# The docs as a user of our crates builds them: a throwaway crate (in a temporary directory, outside
# the repository) that depends on locker-core, locker-memory and locker-etcd by path, documented
# with our three crates' pages together (as `cargo doc` makes them, without the pages of tokio and
# the rest) and with `cargo doc --no-deps -p <crate>` (one crate's
# pages alone, as docs.rs builds them: links into the others must still be links, to docs.rs), each
# in a fresh target directory; then the rendered pages of our crates are checked for links left as
# text (`scripts/check-doc-links.sh`). Warnings are errors.
#
#   scripts/check-doc-downstream.sh
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/downstream/src"
cat >"$work/downstream/Cargo.toml" <<TOML
[package]
name = "downstream"
version = "0.0.0"
edition = "2024"
publish = false

[dependencies]
locker-core = { path = "$repo/locker-core" }
locker-memory = { path = "$repo/locker-memory" }
locker-etcd = { path = "$repo/locker-etcd" }

[workspace]
TOML
echo '//! A crate that uses locker.' >"$work/downstream/src/lib.rs"
# The repository's lock file, so the dependencies are the versions we test with (and no registry
# is asked for new ones).
cp Cargo.lock "$work/downstream/Cargo.lock"
export RUSTDOCFLAGS="-D warnings"
cd "$work/downstream"
echo "check-doc-downstream: cargo doc -p locker-core -p locker-memory -p locker-etcd (together)"
# One target directory: what is compiled is shared, and `cargo clean --doc` removes the pages.
export CARGO_TARGET_DIR="$work/target"
cargo doc -q --no-deps -p locker-core -p locker-memory -p locker-etcd
"$repo/scripts/check-doc-links.sh" "$CARGO_TARGET_DIR/doc" locker_core locker_memory locker_etcd
for crate in locker-memory locker-etcd; do
  echo "check-doc-downstream: cargo doc --no-deps -p $crate (its pages alone)"
  cargo clean -q --doc
  cargo doc -q --no-deps -p "$crate"
  [ ! -d "$CARGO_TARGET_DIR/doc/locker_core" ] || { echo "check-doc-downstream: locker_core's pages are there" >&2; exit 1; }
  "$repo/scripts/check-doc-links.sh" "$CARGO_TARGET_DIR/doc" "${crate//-/_}"
done
