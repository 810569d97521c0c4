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

    pub fn set_string(&self, key: &str, value: &str) -> Result<()> {
        rustix::mount::fsconfig_set_string(&self.fd, key, value).map_err(|e| self.fail(&format!("set {key}={value}"), e))
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
