//! Extended attributes of a layer's entries: all of them (not following
//! symlinks), sorted by name so their order never depends on the
//! filesystem. The diff tar carries some of them, and every one counts in
//! the image's size and fingerprint.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::io::Errno;

use crate::error::{Error, Result};

pub(super) type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// All extended attributes of `path` (not following symlinks), sorted by
/// name so their order never depends on the filesystem.
pub(super) fn read_xattrs(path: &Path) -> Result<Xattrs> {
    let names = list_xattrs(path)?;
    let mut out = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| !n.is_empty()) {
        if let Some(v) = get_xattr(path, name)? {
            out.push((name.to_vec(), v));
        }
    }
    out.sort();
    Ok(out)
}

fn list_xattrs(path: &Path) -> Result<Vec<u8>> {
    // The list can grow between the size query and the read: ERANGE, retry.
    loop {
        let len = match rustix::fs::llistxattr_query(path) {
            Ok(n) => n,
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(Error::sys("list xattrs", path, e)),
        };
        let mut buf = vec![0u8; len];
        match rustix::fs::llistxattr(path, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(Error::sys("list xattrs", path, e)),
        }
    }
}

pub(super) fn get_xattr(path: &Path, name: &[u8]) -> Result<Option<Vec<u8>>> {
    let name = OsStr::from_bytes(name);
    let what = || format!("read xattr {}", name.to_string_lossy());
    loop {
        let len = match rustix::fs::lgetxattr_query(path, name) {
            Ok(n) => n,
            // Removed since it was listed.
            Err(Errno::NODATA) => return Ok(None),
            Err(e) => return Err(Error::sys(what(), path, e)),
        };
        let mut buf = vec![0u8; len];
        match rustix::fs::lgetxattr(path, name, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(Errno::RANGE) => continue,
            Err(Errno::NODATA) => return Ok(None),
            Err(e) => return Err(Error::sys(what(), path, e)),
        }
    }
}
