#!/bin/bash
# The main job: with sharedloop installed, put a small three-layer sample
# image into the store (unless IMAGE is given), mount it through mount(8)
# with a throw-away upper, show the merged view, write to it, and unmount.
# The mount is made in a private mount namespace so that an interrupted
# demo leaves nothing mounted on the host.
#
#   scripts/demo.sh [IMAGE]     IMAGE: a chain ID, unique prefix or name in the store
set -euo pipefail

IMAGE=${1:-}
SL=${SHAREDLOOP:-sharedloop}
STORE_OPTS=()
[ -n "${SHAREDLOOP_ROOT:-}" ] && STORE_OPTS+=(--loopback-root "$SHAREDLOOP_ROOT")
[ -n "${SHAREDLOOP_FALLBACK:-}" ] && STORE_OPTS+=(--loopback-fallback "$SHAREDLOOP_FALLBACK")

work=$(mktemp -d /tmp/sharedloop-demo.XXXXXX)
trap 'rm -rf "$work"' EXIT

if [ -z "$IMAGE" ]; then
    echo "== building the sample image sharedloop-sample:1 (3 layers)"
    b="$work/base"; mkdir -p "$b/etc" "$b/usr/share/sample" "$b/var/cache/old"
    printf 'NAME="sharedloop sample"\nVERSION=1\n' > "$b/etc/os-release"
    printf 'base layer\n' > "$b/usr/share/sample/base.txt"
    printf 'to be deleted by layer 2\n' > "$b/usr/share/sample/obsolete.txt"
    printf 'stale\n' > "$b/var/cache/old/entry"
    # Fixed times: the same sample gives the same chain IDs on every run,
    # so a second demo finds its layers in the store instead of adding more.
    pin() { find "$1" -exec touch -h -d @1700000000 {} +; }
    pin "$b"
    base=$("$SL" add "${STORE_OPTS[@]}" "$b")

    a="$work/app"; mkdir -p "$a/usr/share/sample" "$a/usr/bin"
    printf '#!/bin/sh\necho hello from the app layer\n' > "$a/usr/bin/hello"; chmod 755 "$a/usr/bin/hello"
    printf 'app layer\n' > "$a/usr/share/sample/app.txt"
    mknod "$a/usr/share/sample/obsolete.txt" c 0 0          # overlay whiteout
    pin "$a"
    app=$("$SL" add "${STORE_OPTS[@]}" --parent "$base" "$a")

    c="$work/config"; mkdir -p "$c/etc" "$c/var/cache"
    printf 'greeting=hello\n' > "$c/etc/sample.conf"
    printf 'VERSION=1.1\n' > "$c/etc/os-release"              # shadows the base
    mkdir -p "$c/var/cache/old"; setfattr -n trusted.overlay.opaque -v y "$c/var/cache/old"
    printf 'fresh\n' > "$c/var/cache/old/entry2"
    pin "$c"
    IMAGE=$("$SL" add "${STORE_OPTS[@]}" --parent "$app" --name sharedloop-sample:1 "$c")
    echo "   base   $base"
    echo "   app    $app"
    echo "   config $IMAGE (named sharedloop-sample:1)"
    IMAGE=sharedloop-sample:1
fi

opts="upper=tmpfs"
[ -n "${SHAREDLOOP_ROOT:-}" ] && opts="$opts,loopback_root=$SHAREDLOOP_ROOT"
[ -n "${SHAREDLOOP_FALLBACK:-}" ] && opts="$opts,loopback_fallback=$SHAREDLOOP_FALLBACK"
mnt="$work/mnt"; mkdir -p "$mnt"

# This store's layer directories, as the kernel names backing files
# (canonical): the loop devices shown are those of this store only, not
# every /layers/ image some other user or store has attached.
store_json=$("$SL" status "${STORE_OPTS[@]}" --json)
store_dir() {
    local d
    d=$(printf '%s\n' "$store_json" | sed -n "s/^  \"$1\": \"\(.*\)\",\$/\1/p")
    realpath -m "$d"
}
root_layers="$(store_dir loopback_root)/layers/"
fallback_layers="$(store_dir loopback_fallback)/layers/"

unshare -m --propagation private bash -euc '
    image=$1 mnt=$2 opts=$3 root_layers=$4 fallback_layers=$5 sl=$6; shift 6
    echo "== mount -t sharedloop $image $mnt -o $opts"
    mount -t sharedloop "$image" "$mnt" -o "$opts"
    echo "== mountinfo (only the overlay shows; sharedloop mounts lists them):"
    grep " $mnt " /proc/self/mountinfo | cut -c1-160
    echo "== $sl ls $image"
    "$sl" ls "$@" "$image"
    echo "== loop devices of this store ($root_layers, $fallback_layers):"
    losetup --list --noheadings -O NAME,RO,DIO,AUTOCLEAR,BACK-FILE |
        awk -v r=" $root_layers" -v f=" $fallback_layers" "index(\$0, r) || index(\$0, f)" || true
    echo "== merged view:"
    (cd "$mnt" && find . -mindepth 1 | sort)
    [ -e "$mnt/etc/os-release" ] && { echo "== etc/os-release:"; cat "$mnt/etc/os-release"; }
    [ -x "$mnt/usr/bin/hello" ] && "$mnt/usr/bin/hello"
    echo "== writing to the tmpfs upper"
    echo written > "$mnt/new-file" && ls -l "$mnt/new-file"
    echo "== umount $mnt"
    umount "$mnt"
    grep -q " $mnt " /proc/self/mountinfo && { echo "still mounted!" >&2; exit 1; }
    echo "== done: nothing left mounted"
' demo "$IMAGE" "$mnt" "$opts" "$root_layers" "$fallback_layers" "$SL" "${STORE_OPTS[@]}"
