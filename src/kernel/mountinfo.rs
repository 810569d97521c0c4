//! /proc/self/mountinfo: a pure line parser and a reader.
//!
//! Parsed as bytes: a mount point anywhere in the namespace may be a path
//! that is not UTF-8, and one such mount must not make every other
//! unreadable.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::bytes::{mount_unescape, os_from, path_from};
use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u64,
    pub parent: u64,
    pub major: u32,
    pub minor: u32,
    pub root: PathBuf,
    pub mount_point: PathBuf,
    pub mount_options: String,
    pub fstype: String,
    pub source: OsString,
    pub super_options: String,
}

fn num<T: std::str::FromStr>(b: &[u8]) -> Option<T> {
    std::str::from_utf8(b).ok()?.parse().ok()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl MountInfo {
    /// One line: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS`.
    pub fn parse_line(line: &[u8]) -> Option<MountInfo> {
        let sep = line.windows(3).position(|w| w == b" - ")?;
        let (left, right) = (&line[..sep], &line[sep + 3..]);
        let mut l = left.split(|&b| b == b' ');
        let id = num(l.next()?)?;
        let parent = num(l.next()?)?;
        let devno = l.next()?;
        let colon = devno.iter().position(|&b| b == b':')?;
        let root = path_from(&mount_unescape(l.next()?));
        let mount_point = path_from(&mount_unescape(l.next()?));
        let mount_options = text(l.next()?);
        let mut r = right.splitn(3, |&b| b == b' ');
        let fstype = text(r.next()?);
        let source = os_from(mount_unescape(r.next()?));
        let super_options = text(r.next().unwrap_or(b"").trim_ascii_end());
        Some(MountInfo {
            id,
            parent,
            major: num(&devno[..colon])?,
            minor: num(&devno[colon + 1..])?,
            root,
            mount_point,
            mount_options,
            fstype,
            source,
            super_options,
        })
    }

    pub fn parse_all(text: &[u8]) -> Vec<MountInfo> {
        text.split(|&b| b == b'\n').filter_map(MountInfo::parse_line).collect()
    }
}

pub const SELF: &str = "/proc/self/mountinfo";

pub fn read() -> Result<Vec<MountInfo>> {
    let t = std::fs::read(SELF).map_err(|e| Error::io("read", SELF, &e))?;
    Ok(MountInfo::parse_all(&t))
}

/// The topmost mount at `target`, if any (the last one listed wins).
pub fn find_at(mounts: &[MountInfo], target: &Path) -> Option<MountInfo> {
    mounts.iter().rev().find(|m| m.mount_point == target).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn parse_lines() {
        type Want<'a> = Option<(u64, &'a [u8], &'a str, &'a [u8], &'a str)>;
        let cases: &[(&[u8], Want)] = &[
            (
                b"64 43 0:40 / /tmp/exp/t rw,relatime - tmpfs mysrc rw,size=1024k",
                Some((64, b"/tmp/exp/t", "tmpfs", b"mysrc", "rw,size=1024k")),
            ),
            (
                b"36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue",
                Some((36, b"/mnt/with space", "ext3", b"/dev/root", "rw,errors=continue")),
            ),
            (
                b"70 64 0:45 / /m ro shared:5 master:2 - overlay sha256:abc ro,lowerdir+=/a,lowerdir+=/b",
                Some((70, b"/m", "overlay", b"sha256:abc", "ro,lowerdir+=/a,lowerdir+=/b")),
            ),
            (b"71 64 0:45 / /m ro - overlay debian:12 ", Some((71, b"/m", "overlay", b"debian:12", ""))),
            // Not UTF-8: kept byte for byte.
            (b"72 64 0:46 / /srv/caf\xe9 rw - tmpfs src\xff rw", Some((72, b"/srv/caf\xe9", "tmpfs", b"src\xff", "rw"))),
            (b"garbage", None),
            (b"1 2 3:x / /m rw - a b c", None),
            (b"", None),
        ];
        for (line, want) in cases {
            let got = MountInfo::parse_line(line).map(|m| {
                (m.id, m.mount_point.as_os_str().as_bytes().to_vec(), m.fstype, m.source.as_bytes().to_vec(), m.super_options)
            });
            let want = want.map(|(a, b, c, d, e)| (a, b.to_vec(), c.to_string(), d.to_vec(), e.to_string()));
            assert_eq!(got, want, "{line:?}");
        }
    }

    #[test]
    fn topmost_wins() {
        let m = MountInfo::parse_all(b"1 0 0:1 / /m rw - tmpfs a rw\n2 1 0:2 / /m rw - overlay b rw\n");
        assert_eq!(find_at(&m, Path::new("/m")).unwrap().source, "b");
        assert!(find_at(&m, Path::new("/x")).is_none());
    }
}
