//! The running kernel's version, from procfs, and what follows from it.

use std::fmt;

use crate::error::{Error, Result};

pub const OSRELEASE: &str = "/proc/sys/kernel/osrelease";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl Version {
    /// "6.18.44-fc-v669" -> 6.18.44; "4.0-rc1" -> 4.0.0.
    pub fn parse(release: &str) -> Option<Version> {
        let core = release.trim().split(|c: char| !(c.is_ascii_digit() || c == '.')).next()?;
        let mut it = core.split('.').filter(|s| !s.is_empty()).map(|s| s.parse::<u32>());
        let major = it.next()?.ok()?;
        let minor = it.next()?.ok()?;
        let patch = it.next().and_then(|r| r.ok()).unwrap_or(0);
        Some(Version(major, minor, patch))
    }

    pub fn running() -> Result<Version> {
        let s = std::fs::read_to_string(OSRELEASE).map_err(|e| Error::io("read kernel version", OSRELEASE, &e))?;
        Version::parse(&s).ok_or_else(|| Error::Store(format!("{OSRELEASE}: cannot parse kernel release {:?}", s.trim())))
    }

    /// Multiple lower layers in one overlay mount (4.0).
    pub fn has_multi_lower(self) -> bool {
        self >= Version(4, 0, 0)
    }
    /// LOOP_CONFIGURE (5.8).
    pub fn has_loop_configure(self) -> bool {
        self >= Version(5, 8, 0)
    }
    /// fsopen/fsconfig/fsmount (5.2).
    pub fn has_new_mount_api(self) -> bool {
        self >= Version(5, 2, 0)
    }
    /// overlayfs `lowerdir+` (6.8), which lifts the 255-byte fsconfig cap.
    pub fn has_lowerdir_add(self) -> bool {
        self >= Version(6, 8, 0)
    }
    /// overlayfs layers given as file descriptors, detached mounts included (6.13).
    pub fn has_layer_fds(self) -> bool {
        self >= Version(6, 13, 0)
    }
    /// erofs mounts an image file directly, no loop device (6.12).
    pub fn has_erofs_file_backed(self) -> bool {
        self >= Version(6, 12, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_releases() {
        let cases = [
            ("6.18.44-fc-v669", Some(Version(6, 18, 44))),
            ("4.0.0", Some(Version(4, 0, 0))),
            ("4.0-rc1\n", Some(Version(4, 0, 0))),
            ("3.10.0-1160.el7.x86_64", Some(Version(3, 10, 0))),
            ("5.8", Some(Version(5, 8, 0))),
            ("garbage", None),
            ("", None),
            ("6", None),
        ];
        for (s, want) in cases {
            assert_eq!(Version::parse(s), want, "{s:?}");
        }
        assert!(!Version(3, 10, 0).has_multi_lower());
        assert!(Version(6, 13, 0).has_layer_fds() && !Version(6, 12, 9).has_layer_fds());
    }
}
