#!/usr/bin/env bash
# The whole test suite, with its set-up: installs what the tests need where it is missing, then runs
# `cargo test --workspace` and the examples on etcd (with arguments: `cargo test ARGS` only).
#
#   scripts/test.sh                                  # everything
#   scripts/test.sh -p locker-etcd --test faults     # what the arguments pick
#
# What the tests need besides the Rust toolchain:
#   - protoc with protobuf's well-known types (etcd-client's build script compiles etcd's protos);
#   - an etcd binary (the etcd tests start their own servers and clusters on loopback ports);
#   - etcdctl (interop with `etcdctl lock` and `etcdctl elect`);
#   - Docker's engine, for the one test that runs etcd in a container (the image is built here
#     from the local etcd binary: no registry is needed).
# On Debian or Ubuntu, as root or with passwordless sudo, the missing packages are installed with
# apt-get; elsewhere the script stops and prints the command that installs them. After the
# workspace's tests it runs the examples' tests again with their etcd feature, so each example
# also runs on a real etcd.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'test.sh: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

# Whether protoc can compile a file that imports one of protobuf's well-known types (Debian's
# protobuf-compiler without libprotobuf-dev has protoc but not those).
protoc_works() {
  local protoc=${PROTOC:-protoc} dir
  command -v "$protoc" >/dev/null 2>&1 || return 1
  dir=$(mktemp -d)
  printf 'syntax = "proto3";\nimport "google/protobuf/descriptor.proto";\n' >"$dir/probe.proto"
  if "$protoc" -I "$dir" --descriptor_set_out=/dev/null "$dir/probe.proto" >/dev/null 2>&1; then
    rm -rf "$dir"
    return 0
  fi
  rm -rf "$dir"
  return 1
}

# The etcd and etcdctl the tests will run: LOCKER_ETCD_BIN / LOCKER_ETCDCTL_BIN when set (then
# they must be executable files), else the ones on PATH.
etcd_bin() { if [ -n "${LOCKER_ETCD_BIN:-}" ]; then [ -f "$LOCKER_ETCD_BIN" ] && [ -x "$LOCKER_ETCD_BIN" ]; else command -v etcd >/dev/null 2>&1; fi; }
etcdctl_bin() { if [ -n "${LOCKER_ETCDCTL_BIN:-}" ]; then [ -f "$LOCKER_ETCDCTL_BIN" ] && [ -x "$LOCKER_ETCDCTL_BIN" ]; else command -v etcdctl >/dev/null 2>&1; fi; }
[ -z "${LOCKER_ETCD_BIN:-}" ] || etcd_bin || die "LOCKER_ETCD_BIN=$LOCKER_ETCD_BIN is not an executable file"
[ -z "${LOCKER_ETCDCTL_BIN:-}" ] || etcdctl_bin || die "LOCKER_ETCDCTL_BIN=$LOCKER_ETCDCTL_BIN is not an executable file"

missing=()
protoc_works || missing+=(protoc)
etcd_bin || missing+=(etcd)
etcdctl_bin || missing+=(etcdctl)

if [ ${#missing[@]} -gt 0 ]; then
  say "missing: ${missing[*]}"
  os_id= os_like=
  if [ -r /etc/os-release ]; then
    os_id=$(. /etc/os-release && printf '%s' "${ID:-}")
    os_like=$(. /etc/os-release && printf '%s' "${ID_LIKE:-}")
  fi
  packages=()
  for m in "${missing[@]}"; do
    case $m in
      protoc) packages+=(protobuf-compiler libprotobuf-dev) ;;
      etcd) packages+=(etcd-server) ;;
      etcdctl) packages+=(etcd-client) ;;
    esac
  done
  case " $os_id $os_like " in
    *" debian "* | *" ubuntu "*)
      if [ "$(id -u)" -eq 0 ]; then
        sudo=()
      elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        sudo=(sudo)
      else
        die "install them as root: apt-get install ${packages[*]}"
      fi
      say "installing with apt-get: ${packages[*]}"
      # Through env: sudo drops the caller's environment.
      "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq
      "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
      ;;
    *)
      if [ "$(uname -s)" = Darwin ]; then
        install="brew install etcd protobuf"
      else
        case " $os_id $os_like " in
          *" fedora "* | *" rhel "* | *" centos "*) install="dnf install etcd protobuf-compiler protobuf-devel" ;;
          *" arch "*) install="pacman -S etcd protobuf" ;;
          *" alpine "*) install="apk add etcd etcd-ctl protobuf protobuf-dev" ;;
          *" suse "* | *" opensuse "*) install="zypper install etcd etcdctl protobuf-devel" ;;
          *) install="install etcd 3.4+ (etcd and etcdctl: https://github.com/etcd-io/etcd/releases) and protoc with its include files (https://github.com/protocolbuffers/protobuf/releases)" ;;
        esac
      fi
      die "this script installs packages only on Debian or Ubuntu; here: $install
  (or point the tests at what you have: PROTOC, LOCKER_ETCD_BIN, LOCKER_ETCDCTL_BIN, or an existing
  cluster in LOCKER_ETCD_ENDPOINTS)"
      ;;
  esac
  protoc_works || die "protoc still cannot compile etcd's protos (google/protobuf/descriptor.proto not found)"
  etcd_bin || die "etcd is still not on PATH"
  etcdctl_bin || die "etcdctl is still not on PATH"
fi
say "protoc: $(${PROTOC:-protoc} --version)"

# The test servers run with --unsafe-no-fsync, which etcd has from 3.4.10 on (Debian 11 and Ubuntu
# 22.04 ship 3.3).
etcd_version=$("${LOCKER_ETCD_BIN:-etcd}" --version 2>/dev/null | sed -n 's/^etcd Version: *//p' | head -n 1)
say "etcd: ${etcd_version:-unknown version}"
if ! printf '%s\n%s\n' 3.4.10 "${etcd_version:-0}" | sort -V -C; then
  die "etcd ${etcd_version:-of unknown version} is too old: the tests need etcd 3.4.10 or later. Get a
  release from https://github.com/etcd-io/etcd/releases and set LOCKER_ETCD_BIN (and
  LOCKER_ETCDCTL_BIN) to its binaries."
fi

# The Docker test: a local etcd image, built from the etcd binary (no registry needed).
if [ -z "${LOCKER_ETCD_IMAGE:-}" ]; then
  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then
    LOCKER_ETCD_IMAGE=$(scripts/etcd-image.sh | tail -n 1)
    export LOCKER_ETCD_IMAGE
    say "Docker: local etcd image $LOCKER_ETCD_IMAGE"
  else
    say "no reachable Docker engine: the test etcd::docker::lock_hand_off_on_etcd_in_docker (locker-etcd) will fail" \
      "(install and start Docker, or set LOCKER_ETCD_IMAGE to an image Docker can run)"
  fi
fi

# Everything, unless the arguments say what (`-p locker-memory`; `--workspace` would override it).
[ $# -gt 0 ] || set -- --workspace
say "cargo test $*"
cargo test "$@"
# The examples on etcd too (their etcd support is a feature, off in the workspace build), and the
# state machine's model checker once more with its output shown (the states it explored); not
# when the arguments pick what to run.
if [ "$*" = --workspace ]; then
  say "cargo test -p locker-core --lib machine::model -- --nocapture (the model checker's state counts)"
  cargo test -p locker-core --lib machine::model -- --nocapture 2>&1 | grep -E '^(model|test result)'
  say "cargo test -p locker-examples --features etcd-tests"
  cargo test -p locker-examples --features etcd-tests
fi
