#!/usr/bin/env bash
# Builds Redis 8 (with TLS) from Debian experimental's source package, for the second run of the
# Redis tests: Debian bookworm ships 7.0.15, the oldest version relq supports; this is the newest.
# Prints the directory holding redis-server and redis-cli. A directory that already holds them
# is reused.
#
#   dir=$(bash .ci/redis8.sh [DIR])       # default DIR: target/redis8
#   RELQ_REDIS_SERVER=$dir/redis-server RELQ_REDIS_CLI=$dir/redis-cli cargo test -p relq-conformance --test redis
set -euo pipefail
version=5:8.6.3-1
dest=$(realpath -m "${1:-target/redis8}")
if [ -x "$dest/redis-server" ] && [ -x "$dest/redis-cli" ]; then
  echo "$dest"; exit 0
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
{
  if ! apt-cache showsrc redis 2>/dev/null | grep -q "^Version: ${version}$"; then
    $SUDO tee /etc/apt/sources.list.d/relq-experimental-src.sources >/dev/null <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: experimental
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    $SUDO apt-get update -qq
  fi
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq make gcc pkg-config libssl-dev >/dev/null
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  cd "$work"
  apt-get source --download-only "redis=$version" 2>&1 | grep -v '^W: Download is performed unsandboxed' || true
  tar xzf redis_*.orig.tar.gz
  cd redis-*/
  make -j"$(nproc)" BUILD_TLS=yes >build.log 2>&1 || { tail -40 build.log; exit 1; }
  mkdir -p "$dest"
  cp src/redis-server src/redis-cli "$dest/"
} >&2
"$dest/redis-server" --version >&2
echo "$dest"
