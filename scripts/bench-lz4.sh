#!/bin/sh
# Store size, add time and read throughput of erofs layers written with
# and without --compress lz4. As root: scripts/bench-lz4.sh [TREE] [RUNS]
# (TREE default /usr/share, copied to a temp dir; RUNS default 5).
# Reads go through a kernel mount (unshare -m, ro,loop) after dropping
# the page cache; medians of RUNS.
set -eu
tree=${1:-/usr/share}
runs=${2:-5}
bin=${SHAREDLOOP:-${CARGO_TARGET_DIR:-target}/release/sharedloop}
t=$(mktemp -d /var/tmp/bench-lz4.XXXXXX)
trap 'rm -rf "$t"' EXIT
cp -a "$tree" "$t/src"
big=$(find "$t/src" -type f -printf '%s %P\n' | sort -n | tail -1 | cut -d' ' -f2-)
echo "tree $tree: $(du -sb "$t/src" | cut -f1) bytes; big file $big ($(stat -c %s "$t/src/$big") bytes)"
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
for c in none lz4; do
  mkdir -p "$t/$c/root" "$t/$c/fb"
  s=$(date +%s.%N)
  id=$("$bin" add "$t/src" --fstype erofs --compress $c --loopback-root "$t/$c/root" --loopback-fallback "$t/$c/fb" | sed 's/^sha256://')
  e=$(date +%s.%N)
  img="$t/$c/root/layers/$id/layer.img"
  echo "$c: add $(echo "$e - $s" | bc) s, image $(stat -c %s "$img") bytes apparent, $(du -B1 "$img" | cut -f1) allocated"
  for i in $(seq "$runs"); do
    unshare -m sh -c "mkdir -p $t/mnt && mount -o ro,loop '$img' $t/mnt && sync && echo 3 > /proc/sys/vm/drop_caches && dd if='$t/mnt/$big' of=/dev/null bs=1M 2>&1 | tail -1 | sed 's/.*s, //'; umount $t/mnt" > "$t/$c.read.$i"
  done
  cat "$t"/$c.read.* | awk '{print $1" "$2}' | sort -n | awk '{a[NR]=$0} END {print "'$c': cold read of the big file, median of " NR ": " a[int((NR+1)/2)]}'
done
