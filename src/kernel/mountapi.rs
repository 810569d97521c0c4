//! The new mount API (fsopen/fsconfig/fsmount) with the kernel's own
//! messages kept: a filesystem that refuses a mount says why on the
//! fs_context fd, and that text goes into our error.

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use rustix::io::Errno;
use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags};

use crate::error::{Errno as E, Error, Result};

pub struct FsContext {
    fd: OwnedFd,
    /// For messages: what this mount is ("layer sha256:…", "overlay").
    what: String,
    /// For messages: the device or file it concerns.
    path: PathBuf,
}

impl FsContext {
    pub fn open(fstype: &str, what: impl Into<String>, path: impl Into<PathBuf>) -> Result<FsContext> {
        let what = what.into();
        let path = path.into();
        let fd = rustix::mount::fsopen(fstype, FsOpenFlags::FSOPEN_CLOEXEC)
            .map_err(|e| Error::sys(format!("{what}: fsopen {fstype}"), &path, e))?;
        Ok(FsContext { fd, what, path })
    }

    /// Drain the kernel's messages ("e overlayfs: ...") from the context.
    fn messages(&self) -> Vec<String> {
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        for _ in 0..32 {
            match rustix::io::read(&self.fd, &mut buf) {
                Ok(n) if n > 0 => {
                    let m = String::from_utf8_lossy(&buf[..n]).trim().to_string();
                    out.push(m.strip_prefix("e ").or(m.strip_prefix("w ")).unwrap_or(&m).to_string());
                }
                _ => break,
            }
        }
        out
    }

    fn fail(&self, op: &str, e: Errno) -> Error {
        let mut kmsg = self.messages();
        if kmsg.is_empty() && e == Errno::INVAL {
            // Some refusals are only printk'd, not logged on the context.
            kmsg.push("no reason logged on the mount context; see the kernel log (dmesg)".into());
        }
        Error::Mount { what: format!("{}: {op}", self.what), path: self.path.clone(), errno: E(e), kmsg }
    }

    /// `value` is bytes: a path (a lower layer's directory) need not be UTF-8.
    pub fn set_string(&self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Result<()> {
        let value = value.as_ref();
        rustix::mount::fsconfig_set_string(&self.fd, key, value)
            .map_err(|e| self.fail(&format!("set {key}={}", value.to_string_lossy()), e))
    }

    pub fn set_flag(&self, key: &str) -> Result<()> {
        rustix::mount::fsconfig_set_flag(&self.fd, key).map_err(|e| self.fail(&format!("set {key}"), e))
    }

    pub fn set_fd(&self, key: &str, fd: impl AsFd) -> Result<()> {
        rustix::mount::fsconfig_set_fd(&self.fd, key, fd).map_err(|e| self.fail(&format!("set {key} by fd"), e))
    }

    pub fn create(&self) -> Result<()> {
        rustix::mount::fsconfig_create(&self.fd).map_err(|e| self.fail("create superblock", e))
    }

    /// A detached mount of the new superblock: in no namespace's tree, gone
    /// when its fd (and anything built on it) is closed.
    pub fn mount(&self, attrs: MountAttrFlags) -> Result<OwnedFd> {
        rustix::mount::fsmount(&self.fd, FsMountFlags::FSMOUNT_CLOEXEC, attrs).map_err(|e| self.fail("fsmount", e))
    }
}

/// Attach a detached mount at `target`.
pub fn attach_at(mnt: impl AsFd, target: &Path) -> Result<()> {
    rustix::mount::move_mount(mnt, "", rustix::fs::CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH)
        .map_err(|e| Error::sys("attach mount", target, e))
}

/// The ID of the mount `fd` is on (a detached mount keeps its ID when it
/// is attached, which is what lets a mount be recorded before it is
/// visible). statx(STATX_MNT_ID) where the kernel has it (5.8+), else the
/// `mnt_id:` line of /proc/self/fdinfo (3.15+).
pub fn mount_id(fd: impl AsFd, what: &Path) -> Result<u64> {
    use rustix::fs::{AtFlags, StatxFlags};
    match rustix::fs::statx(&fd, "", AtFlags::EMPTY_PATH, StatxFlags::MNT_ID) {
        Ok(st) if StatxFlags::from_bits_retain(st.stx_mask).contains(StatxFlags::MNT_ID) => return Ok(st.stx_mnt_id),
        Ok(_) | Err(Errno::NOSYS) | Err(Errno::INVAL) => {}
        Err(e) => return Err(Error::sys("statx", what, e)),
    }
    let info = format!("/proc/self/fdinfo/{}", std::os::fd::AsRawFd::as_raw_fd(&fd.as_fd()));
    let text = std::fs::read_to_string(&info).map_err(|e| Error::io("read mount id", &info, &e))?;
    parse_fdinfo_mnt_id(&text).ok_or_else(|| Error::Internal(format!("{info}: no mnt_id line")))
}

fn parse_fdinfo_mnt_id(text: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix("mnt_id:")).and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fdinfo_mount_ids() {
        assert_eq!(parse_fdinfo_mnt_id("pos:\t0\nflags:\t02100000\nmnt_id:\t29\nino:\t5\n"), Some(29));
        assert_eq!(parse_fdinfo_mnt_id("pos:\t0\n"), None);
        // statx and fdinfo agree on a real fd.
        let fd = rustix::fs::open("/", rustix::fs::OFlags::PATH | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty()).unwrap();
        let via_statx = mount_id(&fd, Path::new("/")).unwrap();
        let text = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", std::os::fd::AsRawFd::as_raw_fd(&fd))).unwrap();
        assert_eq!(parse_fdinfo_mnt_id(&text), Some(via_statx));
    }
}
