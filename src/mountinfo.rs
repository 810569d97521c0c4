//! /proc/self/mountinfo: a pure line parser and a reader.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountInfo {
    pub id: u64,
    pub parent: u64,
    pub major: u32,
    pub minor: u32,
    pub root: String,
    pub mount_point: PathBuf,
    pub mount_options: String,
    pub fstype: String,
    pub source: String,
    pub super_options: String,
}

/// Undo the kernel's octal escapes (`\040` for space, `\011`, `\012`, `\134`).
pub fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = (oct[0] - b'0') as u32 * 64 + (oct[1] - b'0') as u32 * 8 + (oct[2] - b'0') as u32;
                if v <= 255 {
                    out.push(v as u8);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl MountInfo {
    /// One line: `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTS`.
    pub fn parse_line(line: &str) -> Option<MountInfo> {
        let (left, right) = line.split_once(" - ")?;
        let mut l = left.split(' ');
        let id = l.next()?.parse().ok()?;
        let parent = l.next()?.parse().ok()?;
        let (maj, min) = l.next()?.split_once(':')?;
        let root = unescape(l.next()?);
        let mount_point = PathBuf::from(unescape(l.next()?));
        let mount_options = l.next()?.to_string();
        let mut r = right.splitn(3, ' ');
        let fstype = r.next()?.to_string();
        let source = unescape(r.next()?);
        let super_options = r.next().unwrap_or("").trim_end().to_string();
        Some(MountInfo {
            id,
            parent,
            major: maj.parse().ok()?,
            minor: min.parse().ok()?,
            root,
            mount_point,
            mount_options,
            fstype,
            source,
            super_options,
        })
    }

    pub fn parse_all(text: &str) -> Vec<MountInfo> {
        text.lines().filter_map(MountInfo::parse_line).collect()
    }
}

pub const SELF: &str = "/proc/self/mountinfo";

pub fn read() -> Result<Vec<MountInfo>> {
    let t = std::fs::read_to_string(SELF).map_err(|e| Error::io("read", SELF, &e))?;
    Ok(MountInfo::parse_all(&t))
}

/// The topmost mount at `target`, if any (the last one listed wins).
pub fn find_at(mounts: &[MountInfo], target: &Path) -> Option<MountInfo> {
    mounts.iter().rev().find(|m| m.mount_point == target).cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_lines() {
        let cases: &[(&str, Option<(u64, &str, &str, &str, &str)>)] = &[
            (
                "64 43 0:40 / /tmp/exp/t rw,relatime - tmpfs mysrc rw,size=1024k",
                Some((64, "/tmp/exp/t", "tmpfs", "mysrc", "rw,size=1024k")),
            ),
            (
                "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 - ext3 /dev/root rw,errors=continue",
                Some((36, "/mnt/with space", "ext3", "/dev/root", "rw,errors=continue")),
            ),
            (
                "70 64 0:45 / /m ro shared:5 master:2 - overlay sha256:abc ro,lowerdir+=/a,lowerdir+=/b",
                Some((70, "/m", "overlay", "sha256:abc", "ro,lowerdir+=/a,lowerdir+=/b")),
            ),
            ("71 64 0:45 / /m ro - overlay debian:12 ", Some((71, "/m", "overlay", "debian:12", ""))),
            ("garbage", None),
            ("1 2 3:x / /m rw - a b c", None),
            ("", None),
        ];
        for (line, want) in cases {
            let got = MountInfo::parse_line(line)
                .map(|m| (m.id, m.mount_point.to_str().unwrap().to_string(), m.fstype, m.source, m.super_options));
            let want = want.map(|(a, b, c, d, e)| (a, b.to_string(), c.to_string(), d.to_string(), e.to_string()));
            assert_eq!(got, want, "{line:?}");
        }
    }

    #[test]
    fn unescapes() {
        assert_eq!(unescape("a\\040b\\011c\\012d\\134e"), "a b\tc\nd\\e");
        assert_eq!(unescape("trailing\\04"), "trailing\\04");
        assert_eq!(unescape("\\999"), "\\999");
    }

    #[test]
    fn topmost_wins() {
        let m = MountInfo::parse_all("1 0 0:1 / /m rw - tmpfs a rw\n2 1 0:2 / /m rw - overlay b rw\n");
        assert_eq!(find_at(&m, Path::new("/m")).unwrap().source, "b");
        assert!(find_at(&m, Path::new("/x")).is_none());
    }
}
