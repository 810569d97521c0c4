#!/bin/bash
# Run one command as root inside a qemu VM (TCG; no KVM needed) booted on
# Debian 12's own kernel (linux-image-cloud-amd64, 6.1), with the host's
# root file system visible read-only, so the host's build (test binaries)
# and tools (mkfs.*, umoci, skopeo, strace, util-linux ...) run there as
# they are. Used by tests/kernel_vm.rs for the kernel matrix (issue 9).
#
#   scripts/kernel-vm.sh [OPTIONS] [--] COMMAND [ARG...]
#   scripts/kernel-vm.sh --prepare        fetch the kernel, build the initramfs, exit
#
# Options:
#   --timeout SECS    hard limit for the whole VM, boot included (default 900)
#   --mem MIB         guest memory (default 6144)
#   --tmp-size MIB    size of the guest's /tmp (default 4096), out of --mem
#   --tmp-fs ext4|tmpfs  what /tmp is (default ext4, on a RAM disk: as on a
#                     Debian 12 host, whose /tmp is on its root file system;
#                     tmpfs has user.* xattrs only from Linux 6.6 on)
#   --cpus N          guest CPUs (default: host CPUs, at most 4)
#   --env NAME=VALUE  put NAME in the command's environment (repeatable);
#                     the command otherwise gets PATH, HOME=/root, LANG=C.UTF-8
#   --scratch DIR     a writable host directory, shared at the same path in
#                     the guest (the command can leave results there); by
#                     default a fresh one under the cache, removed at the end
#   --quiet           no progress lines on stderr
#
# The command runs in the host's current directory, with a fresh private
# /tmp (ext4 on a RAM disk), /var/tmp and /run (tmpfs), /dev (devtmpfs: loop-control and loop
# devices), /proc and /sys. Its standard output and error (merged) are
# printed on stdout once the VM is off; the script exits with the
# command's status, 124 if the hard timeout hit, 125 if the VM failed
# before the command had finished (it then prints the serial console).
#
# How: virtiofs (two virtiofsd daemons: / read-only, the scratch directory
# writable; Debian's cloud kernel has no 9p) and a small initramfs (busybox
# and the kernel's modules) whose /init mounts them, loads modules, chroots
# into the host root for the command and powers off. The guest has no
# network (-nic none). Only the qemu and virtiofsd processes this script
# started are ever killed, and they die with it (parent-death signal).
#
# Cache: $KERNEL_VM_CACHE, default ${CARGO_TARGET_DIR:-target}/kernel-vm
# (relative to the repository): the .deb, its unpacked tree and the
# initramfs. Fetched once with apt-get download (the kernel is never
# installed on the host); KERNEL_VM_PACKAGE picks another kernel package.
# Needs: qemu-system-x86, virtiofsd, busybox-static, cpio (install-deps.sh).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
timeout_s=900
mem=6144
tmp_size=4096
tmp_fs=ext4
cpus=$(nproc 2>/dev/null || echo 2)
[ "$cpus" -gt 4 ] && cpus=4
envs=()
scratch=""
quiet=0
prepare_only=0

die() { echo "kernel-vm: $*" >&2; exit 125; }
say() { [ "$quiet" = 1 ] || echo "kernel-vm: $*" >&2; }

while [ $# -gt 0 ]; do
    case $1 in
        --timeout) timeout_s=$2; shift 2 ;;
        --mem) mem=$2; shift 2 ;;
        --tmp-size) tmp_size=$2; shift 2 ;;
        --tmp-fs) case $2 in ext4|tmpfs) tmp_fs=$2 ;; *) die "--tmp-fs: ext4 or tmpfs" ;; esac; shift 2 ;;
        --cpus) cpus=$2; shift 2 ;;
        --env) case $2 in [A-Za-z_]*=*) envs+=("$2") ;; *) die "--env wants NAME=VALUE, not $2" ;; esac; shift 2 ;;
        --scratch) scratch=$2; shift 2 ;;
        --quiet) quiet=1; shift ;;
        --prepare) prepare_only=1; shift ;;
        --) shift; break ;;
        -*) die "unknown option $1" ;;
        *) break ;;
    esac
done
[ "$prepare_only" = 1 ] || [ $# -gt 0 ] || die "no command (usage: $0 [OPTIONS] [--] COMMAND [ARG...])"

tdir=${CARGO_TARGET_DIR:-target}
case $tdir in /*) ;; *) tdir=$repo/$tdir ;; esac
cache=${KERNEL_VM_CACHE:-$tdir/kernel-vm}
case $cache in /*) ;; *) cache=$PWD/$cache ;; esac
pkg=${KERNEL_VM_PACKAGE:-linux-image-cloud-amd64}

find_tool() { # NAME CANDIDATE...: the first executable one
    local n=$1 c; shift
    for c in "$@"; do
        [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
    done
    c=$(command -v "$n" 2>/dev/null) && { echo "$c"; return 0; }
    return 1
}
qemu=$(find_tool qemu-system-x86_64 "${QEMU:-}") || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86; scripts/install-deps.sh)"
# virtiofsd: the Rust one (Debian 13's package in /usr/libexec, or in PATH)
# or the C one qemu-system-common ships on Debian 12 (/usr/lib/qemu); they
# take different options.
virtiofsd=$(find_tool virtiofsd "${VIRTIOFSD:-}" /usr/libexec/virtiofsd "$(command -v virtiofsd 2>/dev/null || true)" /usr/lib/qemu/virtiofsd) ||
    die "virtiofsd not found (qemu-system-x86 on Debian 12; scripts/install-deps.sh)"
if "$virtiofsd" --help 2>&1 | grep -q -- '--shared-dir'; then vfs_rust=1; else vfs_rust=0; fi
busybox=$(find_tool busybox /bin/busybox /usr/bin/busybox) || die "busybox not found (apt-get install busybox-static)"
if ldd "$busybox" >/dev/null 2>&1; then die "$busybox is dynamically linked; the initramfs needs busybox-static"; fi
command -v cpio >/dev/null || die "cpio not found (apt-get install cpio)"

# ------------------------------------------------------------------ cache
# The kernel's package, resolved once (the metapackage names the versioned
# one) and kept: later runs use the cached kernel even if Debian moves on.
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock -w 600 9 || die "cache $cache is locked by another run"
if [ ! -s "$cache/kernel-release" ] || [ ! -d "$cache/tree/lib/modules/$(cat "$cache/kernel-release")" ] ||
   [ "$(cat "$cache/package" 2>/dev/null)" != "$pkg" ]; then
    say "fetching $pkg into $cache"
    rm -rf "$cache/tree" "$cache/tree.new" "$cache/deb" "$cache/initramfs.cpio" "$cache/kernel-release"
    mkdir -p "$cache/deb"
    resolve() {
        local p=$1 dep
        case $p in linux-image-[0-9]*) echo "$p"; return 0 ;; esac
        dep=$(apt-cache depends "$p" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ { print $2; exit }')
        [ -n "$dep" ] && echo "$dep"
    }
    kpkg=$(resolve "$pkg") || { apt-get update -qq >/dev/null 2>&1 || true; kpkg=$(resolve "$pkg"); } ||
        die "cannot resolve $pkg to a kernel package (apt-cache depends $pkg)"
    (cd "$cache/deb" && apt-get download -q -o APT::Sandbox::User=root "$kpkg" >/dev/null) ||
        die "apt-get download $kpkg failed"
    deb=$(ls "$cache/deb"/*.deb | head -1)
    mkdir -p "$cache/tree.new"
    dpkg-deb -x "$deb" "$cache/tree.new"
    rel=$(ls "$cache/tree.new/lib/modules" | head -1)
    [ -n "$rel" ] && [ -f "$cache/tree.new/boot/vmlinuz-$rel" ] || die "$deb has no kernel and modules"
    mv "$cache/tree.new" "$cache/tree"
    echo "$rel" >"$cache/kernel-release"
    echo "$pkg" >"$cache/package"
fi
rel=$(cat "$cache/kernel-release")
kernel=$cache/tree/boot/vmlinuz-$rel
moddir=$cache/tree/lib/modules/$rel

# The initramfs: busybox, the modules a test can need (file systems, loop,
# virtio, crypto for checksums) with busybox's modules.dep and aliases, and
# /init below. Rebuilt when this script or busybox is newer.
initrd=$cache/initramfs.cpio
if [ ! -s "$initrd" ] || [ "${BASH_SOURCE[0]}" -nt "$initrd" ] || [ "$busybox" -nt "$initrd" ]; then
    say "building initramfs for $rel"
    st=$cache/initramfs.stage
    rm -rf "$st"
    mkdir -p "$st/bin" "$st/sbin" "$st/usr/bin" "$st/usr/sbin" "$st/proc" "$st/sys" "$st/dev" "$st/newroot" "$st/lib/modules/$rel"
    cp "$busybox" "$st/bin/busybox"
    for d in kernel/fs kernel/lib kernel/crypto kernel/arch kernel/drivers/virtio kernel/drivers/block \
             kernel/drivers/char/hw_random kernel/drivers/char/virtio_console.ko kernel/drivers/md; do
        [ -e "$moddir/$d" ] || continue
        mkdir -p "$st/lib/modules/$rel/$(dirname "$d")"
        cp -a "$moddir/$d" "$st/lib/modules/$rel/$d"
    done
    cp "$moddir/modules.builtin" "$moddir/modules.order" "$st/lib/modules/$rel/" 2>/dev/null || true
    "$busybox" depmod -b "$st" "$rel"
    sed -n '/^#--- init ---$/,/^#--- end ---$/p' "${BASH_SOURCE[0]}" | sed '1d;$d' >"$st/init"
    chmod 755 "$st/init"
    (cd "$st" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --reproducible --quiet) >"$initrd.new"
    mv "$initrd.new" "$initrd"
    rm -rf "$st"
fi
flock -u 9

if [ "$prepare_only" = 1 ]; then
    say "ready: kernel $rel, initramfs $initrd"
    exit 0
fi

# ------------------------------------------------------------------ run
own_scratch=0
if [ -z "$scratch" ]; then
    mkdir -p "$cache/runs"
    scratch=$(mktemp -d "$cache/runs/run.XXXXXX")
    own_scratch=1
else
    mkdir -p "$scratch"
fi
scratch=$(cd "$scratch" && pwd -P)
# The daemons' sockets: in the scratch directory (nothing is left elsewhere
# if this script is killed), unless its path is too long for a socket.
if [ ${#scratch} -lt 80 ]; then sock=$scratch/.sockets; mkdir -p "$sock"; else sock=$(mktemp -d /tmp/kernel-vm-sock.XXXXXX); fi
rm -f "$scratch/rc" "$scratch/output" "$scratch/kernel-version" "$scratch/console.log" "$scratch/dmesg"

q() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }
{
    echo '#!/bin/sh'
    echo 'export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 USER=root LOGNAME=root'
    for e in ${envs[@]+"${envs[@]}"}; do echo "export ${e%%=*}=$(q "${e#*=}")"; done
    echo "cd $(q "$PWD") || exit 125"
    printf 'exec'
    for a in "$@"; do printf ' %s' "$(q "$a")"; done
    echo
} >"$scratch/cmd.sh"

pids=()
cleanup() {
    local p
    for p in ${pids[@]+"${pids[@]}"}; do kill -KILL "$p" 2>/dev/null || true; done
    for p in ${pids[@]+"${pids[@]}"}; do wait "$p" 2>/dev/null || true; done
    pids=()
    rm -rf "$sock"
    if [ "$own_scratch" = 1 ]; then rm -rf "$scratch"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# virtiofsd exits when qemu goes; --pdeathsig makes each go with this
# script too. --sandbox=none: the daemons serve our own guest only.
vfsd() { # NAME DIR ro|rw CACHE: one daemon in the background
    local a
    if [ "$vfs_rust" = 1 ]; then
        a=(--socket-path="$sock/$1" --shared-dir="$2" --sandbox=none --cache="$4" --log-level=error)
        [ "$3" = ro ] && a+=(--readonly)
    else
        # No read-only mode: the guest mounts it ro (our own kernel and /init).
        a=(--socket-path="$sock/$1" -o source="$2" -o sandbox=chroot -o cache="$4" -o log_level=err
           -o announce_submounts)
    fi
    setpriv --pdeathsig KILL -- "$virtiofsd" "${a[@]}" >"$scratch/virtiofsd-$1.log" 2>&1 &
    pids+=($!)
}
vfsd root / ro always
vfsd scratch "$scratch" rw auto
for _ in $(seq 100); do
    [ -S "$sock/root" ] && [ -S "$sock/scratch" ] && break
    sleep 0.1
done
[ -S "$sock/root" ] && [ -S "$sock/scratch" ] || { cat "$scratch"/virtiofsd-*.log >&2; die "virtiofsd did not start"; }

cmdline="console=ttyS0 loglevel=4 panic=-1 mitigations=off i8042.noaux i8042.nokbd i8042.nopnp"
cmdline="$cmdline kvm_scratch=$scratch kvm_tmp=$tmp_size kvm_tmpfs=$tmp_fs"
say "booting $rel (TCG, $cpus CPUs, ${mem} MiB, timeout ${timeout_s}s)"
start=$SECONDS
# timeout (its own child only) holds the hard limit; each of timeout and
# qemu dies with its parent, so a killed script or test leaves no VM.
setpriv --pdeathsig KILL -- timeout --foreground -s KILL "$timeout_s" setpriv --pdeathsig KILL -- \
    "$qemu" -accel tcg,thread=multi -M q35,memory-backend=mem -cpu max -smp "$cpus" -m "$mem" \
    -object memory-backend-memfd,id=mem,size="${mem}M",share=on \
    -nodefaults -no-user-config -display none -vga none -monitor none -no-reboot -nic none \
    -serial file:"$scratch/console.log" \
    -kernel "$kernel" -initrd "$initrd" -append "$cmdline" \
    -chardev socket,id=fsroot,path="$sock/root" -device vhost-user-fs-pci,chardev=fsroot,tag=hostroot \
    -chardev socket,id=fsscratch,path="$sock/scratch" -device vhost-user-fs-pci,chardev=fsscratch,tag=scratch \
    </dev/null >"$scratch/qemu.log" 2>&1 &
qpid=$!
pids+=("$qpid")
qrc=0
wait "$qpid" || qrc=$?
elapsed=$((SECONDS - start))

if [ -s "$scratch/output" ]; then cat "$scratch/output"; fi
if [ -s "$scratch/rc" ]; then
    rc=$(cat "$scratch/rc")
    say "$(cat "$scratch/kernel-version" 2>/dev/null || echo "kernel $rel"): command exited $rc; VM ran ${elapsed}s"
    exit "$rc"
fi
echo "kernel-vm: the VM stopped before the command finished (qemu status $qrc after ${elapsed}s)" >&2
echo "--- qemu:" >&2; cat "$scratch/qemu.log" >&2 || true
echo "--- serial console (last 60 lines):" >&2; tail -n 60 "$scratch/console.log" >&2 || true
if [ "$elapsed" -ge "$timeout_s" ]; then
    echo "kernel-vm: timed out after ${timeout_s}s" >&2
    exit 124
fi
exit 125

# The initramfs's /init, copied out of this file by the build above.
#--- init ---
#!/bin/busybox sh
# kernel-vm /init: mount the host root (virtiofs, read-only) and the scratch
# share, give the command private /tmp /run /dev, run it in the host root,
# power off.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
say() { echo "kernel-vm-init: [$(cut -d' ' -f1 /proc/uptime)s] $*"; }
off() { sync; poweroff -f; sleep 5; exit 1; }
fail() { say "FAILED: $*"; off; }
arg() { for w in $(cat /proc/cmdline); do case $w in "$1="*) echo "${w#*=}" ;; esac; done; }
scratch=$(arg kvm_scratch)
tmpsize=$(arg kvm_tmp)
tmpfs=$(arg kvm_tmpfs)
say "$(cat /proc/version)"
for m in virtio_pci virtiofs loop overlay xfs erofs squashfs fuse crc32c_generic; do
    modprobe "$m" || say "modprobe $m failed"
done
R=/newroot
for i in $(seq 50); do
    mount -t virtiofs -o ro hostroot $R 2>/dev/null && break
    sleep 0.2
done
[ -x $R/bin/sh ] || fail "cannot mount the host root (virtiofs tag hostroot)"
mount -t proc proc $R/proc || fail "proc"
mount -t sysfs sysfs $R/sys || fail "sysfs"
mount -t cgroup2 cgroup2 $R/sys/fs/cgroup 2>/dev/null || true
mount -t devtmpfs devtmpfs $R/dev || fail "devtmpfs"
mkdir -p $R/dev/pts $R/dev/shm
# What udev would add: /dev/fd and /dev/std* (tests read archives from /dev/stdin).
ln -s /proc/self/fd $R/dev/fd
ln -s /proc/self/fd/0 $R/dev/stdin
ln -s /proc/self/fd/1 $R/dev/stdout
ln -s /proc/self/fd/2 $R/dev/stderr
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts $R/dev/pts || fail "devpts"
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm || fail "shm"
if [ "$tmpfs" = ext4 ]; then
    # The host's mke2fs, run in the host root (its /dev is mounted now).
    modprobe brd rd_nr=1 rd_size=$((tmpsize * 1024)) max_part=0 || fail "brd"
    chroot $R /sbin/mke2fs -q -F -t ext4 -m 0 -E lazy_itable_init=1,lazy_journal_init=1 /dev/ram0 || fail "mke2fs /dev/ram0"
    mount -t ext4 -o noinit_itable /dev/ram0 $R/tmp || fail "tmp (ext4)"
    chmod 1777 $R/tmp
    rmdir $R/tmp/lost+found
else
    mount -t tmpfs -o mode=1777,size=${tmpsize}m tmpfs $R/tmp || fail "tmp"
fi
mount -t tmpfs -o mode=1777,size=1g tmpfs $R/var/tmp || fail "var/tmp"
mount -t tmpfs -o mode=755,size=512m tmpfs $R/run || fail "run"
mkdir -p $R/run/lock $R/run/mount && chmod 1777 $R/run/lock
[ -n "$scratch" ] && mount -t virtiofs scratch $R$scratch || fail "cannot mount the scratch share at $scratch"
cat /proc/version >$R$scratch/kernel-version
hostname kernel-vm
say "running $scratch/cmd.sh"
# The host root must be the root of the mount namespace, not a chroot in
# it: setns(2) (nsenter -m, as the tests use) takes a process to the
# namespace's root. So a child moves it onto / (as switch_root does) and
# chroots there; this process keeps the initramfs as its root (a path walk
# does not step down into a mount on its own root), so the kernel's module
# requests and the power-off below still find busybox.
( cd $R && mount --move . / && exec chroot . /bin/sh -c '
    env -i /bin/sh "$1/cmd.sh" >"$1/output" 2>&1
    echo $? >"$1/rc.new"
    dmesg >"$1/dmesg" 2>/dev/null
    mv "$1/rc.new" "$1/rc"
    sync' sh "$scratch" ) || say "could not switch to the host root"
say "command done"
off
#--- end ---
