#!/bin/sh
# Build the sharedloop .deb from a tree made by `make install-files`
# (called by `make deb`): no debhelper, only dpkg-deb.
#
#   build-deb.sh ROOT VERSION ARCH OUTPUT.deb
#
# ROOT is changed in place: the binary is stripped, man pages and the
# README are gzipped (Debian policy 12.3, 12.1), DEBIAN/ is written.
# DEB_MAINTAINER overrides the Maintainer field.
set -eu

root=$1 version=$2 arch=$3 out=$4
here=$(cd "$(dirname "$0")" && pwd)
maintainer=${DEB_MAINTAINER:-sharedloop developers <sharedloop@localhost>}

[ -x "$root/usr/bin/sharedloop" ] || { echo "build-deb: $root/usr/bin/sharedloop missing (run make install-files)" >&2; exit 1; }
[ -n "$version" ] || { echo "build-deb: no version" >&2; exit 1; }

# Strip as dh_strip would (the build keeps its symbols).
if command -v strip >/dev/null 2>&1; then
    strip --strip-unneeded --remove-section=.comment --remove-section=.note "$root/usr/bin/sharedloop"
fi

# gzip -n: no name or time stamp in the header, so the package is reproducible.
find "$root/usr/share/man" -type f -name '*.[0-9]' -exec gzip -9nf {} +
if [ -f "$root/usr/share/doc/sharedloop/README.md" ]; then
    gzip -9nf "$root/usr/share/doc/sharedloop/README.md"
fi

# The lowest glibc symbol version the binary needs.
glibc=$(objdump -T "$root/usr/bin/sharedloop" 2>/dev/null | sed -n 's/.*GLIBC_\([0-9.]*\).*/\1/p' | sort -uV | tail -n 1)
[ -n "$glibc" ] || glibc=2.17

tmpfiles=""
if [ -d "$root/usr/lib/tmpfiles.d" ]; then
    tmpfiles=$(cd "$root/usr/lib/tmpfiles.d" && ls -1 | tr '\n' ' ' | sed 's/ *$//')
fi

rm -rf "$root/DEBIAN"
install -d -m 0755 "$root/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s|@VERSION@|$version|" -e "s|@ARCH@|$arch|" -e "s|@MAINTAINER@|$maintainer|" \
    -e "s|@SIZE@|$size|" -e "s|@GLIBC@|$glibc|" \
    "$here/control.in" >"$root/DEBIAN/control"
install -m 0644 "$here/conffiles" "$root/DEBIAN/conffiles"
sed -e "s|@TMPFILES@|$tmpfiles|" "$here/postinst" >"$root/DEBIAN/postinst"
install -m 0755 "$here/postrm" "$root/DEBIAN/postrm"
chmod 0755 "$root/DEBIAN/postinst"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | LC_ALL=C sort -z | xargs -0r md5sum) >"$root/DEBIAN/md5sums"
chmod 0644 "$root/DEBIAN/md5sums"

# Every conffile must be in the tree.
while read -r f; do
    [ -f "$root$f" ] || { echo "build-deb: conffile $f not in $root" >&2; exit 1; }
done <"$root/DEBIAN/conffiles"

mkdir -p "$(dirname "$out")"
dpkg-deb --root-owner-group -Zxz --build "$root" "$out"
