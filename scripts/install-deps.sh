#!/bin/sh
# Debian packages sharedloop needs to build, run and test. Idempotent and
# quick when everything is there already; apt-get only when something is
# missing. Run as root.
set -eu
need=""
have() { command -v "$1" >/dev/null 2>&1; }
have mkfs.ext4  || need="$need e2fsprogs"
have debugfs    || need="$need e2fsprogs"
have mkfs.xfs   || need="$need xfsprogs"
have mkfs.erofs || need="$need erofs-utils"
have setfattr   || need="$need attr"
have losetup    || need="$need mount"
have nsenter    || need="$need util-linux"
have unshare    || need="$need util-linux"
have make       || need="$need make"
have cc         || need="$need gcc"
if [ -n "$need" ]; then
    echo "install-deps: installing$need"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # shellcheck disable=SC2086
    apt-get install -y -qq --no-install-recommends $need >/dev/null
fi
if ! have cargo; then
    echo "install-deps: cargo not found; install a Rust toolchain (rustup or Debian's cargo)" >&2
    exit 1
fi
modprobe loop 2>/dev/null || true
modprobe overlay 2>/dev/null || true
