#!/usr/bin/env bash
# Builds a small local Docker image of etcd from the etcd binary on this machine, without any
# registry: a `FROM scratch` image holding the binary (as /usr/local/bin/etcd, its ENTRYPOINT),
# exactly the shared libraries `ldd` lists for it (dynamic loader included), and writable /tmp and
# /var/lib/etcd.
#
#   scripts/etcd-image.sh [TAG]        TAG defaults to locker-etcd-local:3.4
#
# The binary is ${LOCKER_ETCD_BIN:-$(command -v etcd)}. Rebuilding is quick and gives the same
# image (the layer is a reproducible tar). Build output goes to stderr; the last line of stdout is
# the tag, for `export LOCKER_ETCD_IMAGE="$(scripts/etcd-image.sh | tail -n 1)"`.
set -euo pipefail

tag=${1:-locker-etcd-local:3.4}

die() { printf 'etcd-image.sh: %s\n' "$*" >&2; exit 1; }

bin=${LOCKER_ETCD_BIN:-$(command -v etcd || true)}
[ -n "$bin" ] || die "no etcd binary: install etcd (apt-get install etcd-server) or set LOCKER_ETCD_BIN"
[ -f "$bin" ] && [ -x "$bin" ] || die "$bin is not an executable file"
command -v docker >/dev/null || die "docker is not installed"
docker info >/dev/null 2>&1 || die "the Docker engine is not reachable (docker info fails)"

version=$("$bin" --version 2>/dev/null | sed -n 's/^etcd Version: *//p' | head -n 1)
version=${version:-unknown}

ctx=$(mktemp -d "${TMPDIR:-/tmp}/locker-etcd-image.XXXXXX")
trap 'rm -rf "$ctx"' EXIT
root=$ctx/rootfs
mkdir -p "$root/usr/local/bin" "$root/tmp" "$root/var/lib/etcd"
chmod 1777 "$root/tmp"
chmod 0700 "$root/var/lib/etcd"
cp -L "$bin" "$root/usr/local/bin/etcd"
chmod 0755 "$root/usr/local/bin/etcd"

# The libraries: `name => /path (addr)`, or `/path (addr)` for the loader; linux-vdso has no file.
# A static binary makes ldd say "not a dynamic executable" (and fail): nothing to copy then.
if libs=$(LC_ALL=C ldd "$bin" 2>&1); then
  if grep -q 'not found' <<<"$libs"; then
    die "$bin links a library that is missing here:"$'\n'"$libs"
  fi
  while read -r lib; do
    [ -n "$lib" ] || continue
    mkdir -p "$root$(dirname "$lib")"
    cp -L "$lib" "$root$lib"
  done < <(awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' <<<"$libs" | sort -u)
elif ! grep -q 'not a dynamic executable\|statically linked' <<<"$libs"; then
  die "ldd $bin failed: $libs"
fi

# A reproducible layer: fixed owner, times and order, so a rebuild hits the build cache.
tar -C "$root" --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf "$ctx/rootfs.tar" .
cat >"$ctx/Dockerfile" <<DOCKERFILE
FROM scratch
ADD rootfs.tar /
LABEL org.opencontainers.image.title="etcd (local build for locker's tests)" \\
      org.opencontainers.image.version="$version"
EXPOSE 2379 2380
WORKDIR /var/lib/etcd
ENTRYPOINT ["/usr/local/bin/etcd"]
CMD ["--data-dir=/var/lib/etcd", "--listen-client-urls=http://0.0.0.0:2379", "--advertise-client-urls=http://127.0.0.1:2379"]
DOCKERFILE

# Without buildx, BuildKit cannot run: use the classic builder (FROM scratch needs no registry).
if [ -z "${DOCKER_BUILDKIT:-}" ] && ! docker buildx version >/dev/null 2>&1; then
  export DOCKER_BUILDKIT=0
fi
previous=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
printf 'etcd-image.sh: building %s from %s (etcd %s)\n' "$tag" "$bin" "$version" >&2
docker build --quiet --tag "$tag" "$ctx" >&2
current=$(docker image inspect --format '{{.Id}}' "$tag")
# A rebuild from another binary leaves the old image untagged: remove it (only if nothing uses it).
if [ -n "$previous" ] && [ "$previous" != "$current" ] &&
  [ -z "$(docker image inspect --format '{{join .RepoTags ","}}' "$previous" 2>/dev/null)" ]; then
  docker image rm "$previous" >/dev/null 2>&1 || true
fi
printf 'etcd-image.sh: %s is %s, %s bytes\n' "$tag" "$current" \
  "$(docker image inspect --format '{{.Size}}' "$tag")" >&2
printf '%s\n' "$tag"
