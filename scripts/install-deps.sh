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
# fsck.erofs checks the images sharedloop writes itself (src/image/erofs_writer tests).
have fsck.erofs || need="$need erofs-utils"
have setfattr   || need="$need attr"
have losetup    || need="$need mount"
have nsenter    || need="$need util-linux"
have unshare    || need="$need util-linux"
have make       || need="$need make"
# udev rules and systemd units are checked with the real tools (tests/udev.rs,
# tests/systemd.rs); neither needs udevd or systemd running.
have udevadm    || need="$need udev"
have systemd-analyze || need="$need systemd"
have systemd-tmpfiles || need="$need systemd"
have systemd-escape || need="$need systemd"
[ -x /lib/systemd/system-generators/systemd-fstab-generator ] || need="$need systemd"
have setpriv    || need="$need util-linux"
# Packaging (make deb, make rpm) and its tests (tests/package.rs): man pages
# are checked with man/groff, completions with bash and zsh, the .deb is
# built with dpkg-deb (strip/objdump from binutils), the spec with rpmbuild.
have man        || need="$need man-db"
have groff      || need="$need groff-base"
have zsh        || need="$need zsh"
# bash reads no completion directory itself: the bash-completion package
# loads completions/sharedloop on demand (from ~/.bashrc, as Debian's skel
# has it). tests/package.rs (bash_completion_in_a_users_shell) checks that.
[ -f /usr/share/bash-completion/bash_completion ] || need="$need bash-completion"
have dpkg-deb   || need="$need dpkg"
have objdump    || need="$need binutils"
have strip      || need="$need binutils"
have rpmbuild   || need="$need rpm"
have cc         || need="$need gcc"
# Import tests (tests/import.rs) build real images: umoci makes OCI layouts
# without a daemon, skopeo converts them (oci-archive, docker-archive, zstd).
have umoci      || need="$need umoci"
have skopeo     || need="$need skopeo"
# Producer tests (tests/producers.rs) build images with buildah (from
# scratch, private vfs storage) and import what it pushes through every
# transport; podman builds one image from a Containerfile.
have buildah    || need="$need buildah"
have podman     || need="$need podman"
# Bundle tests (tests/bundle.rs) run a real busybox image with runc (crun
# refuses hybrid cgroup layouts); its rootfs is busybox-static's binary.
have runc       || need="$need runc"
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || need="$need busybox-static"
# Registry pulls (tests/registry.rs): Debian's reference registry serves
# the pushed test images on 127.0.0.1; htpasswd -B writes its bcrypt users.
have docker-registry || need="$need docker-registry"
have htpasswd   || need="$need apache2-utils"
# Shared-storage tests (tests/shared_storage.rs) run a real GlusterFS
# volume inside namespaces the tests make, mounted by several FUSE clients
# (one per "node"); ip(8) puts the brick address on the namespace's lo.
have glusterd   || need="$need glusterfs-server"
[ -x /sbin/mount.glusterfs ] || [ -x /usr/sbin/mount.glusterfs ] || need="$need glusterfs-client"
have ip         || need="$need iproute2"
have e2fsck     || need="$need e2fsprogs"
# Crash tests (tests/failures.rs) kill the helper at chosen system calls
# with strace's fault injection (-e inject=SYSCALL:signal=KILL:when=N).
have strace     || need="$need strace"
# Kernel matrix (tests/kernel_vm.rs, scripts/kernel-vm.sh): the test
# binaries run again in a qemu VM (TCG, no KVM needed) on Debian 12's own
# 6.1 kernel, fetched by apt-get download into target/kernel-vm (never
# installed). The VM sees the host root over virtiofs (the cloud kernel has
# no 9p; on Debian 12 qemu-system-common ships virtiofsd in /usr/lib/qemu,
# later releases have a virtiofsd package); its initramfs is busybox-static
# and the kernel's modules, packed with cpio; setpriv ties qemu to its parent.
have qemu-system-x86_64 || need="$need qemu-system-x86"
debian=$(cat /etc/debian_version 2>/dev/null || true)
case $debian in
12*|bookworm*) [ -x /usr/lib/qemu/virtiofsd ] || need="$need qemu-system-x86" ;;
*) [ -x /usr/libexec/virtiofsd ] || have virtiofsd || need="$need virtiofsd" ;;
esac
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || need="$need busybox-static"
have cpio       || need="$need cpio"
have setpriv    || need="$need util-linux"
have dpkg-deb   || need="$need dpkg"
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
modprobe fuse 2>/dev/null || true
