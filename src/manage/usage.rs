//! What a stored thing occupies: the one computation behind every size
//! `ls`, `rm`, `gc` and `status` report.
//!
//! Layer images are sparse: a layer of a few bytes has an image of many
//! MiB (its apparent size, `st_size`) of which a few blocks are written.
//! What the disk holds, and what removing it frees, is the allocated size
//! (`st_blocks * 512`): that is the main figure everywhere; the apparent
//! size is shown beside it.
//!
//! The usage of an entry is that of the entry and, for a directory,
//! everything below it: `allocated_bytes` sums `st_blocks * 512` of every
//! file, directory and symlink (the directories too, since removing the
//! entry frees them); `apparent_bytes` sums `st_size` of the regular files.
//! A layer's usage is that of its directory `layers/<hex>` (image and
//! metadata): exactly what `rm` or `gc` frees when it goes.
//!
//! The walk goes through directory fds (`fstatat` with
//! `AT_SYMLINK_NOFOLLOW`, `openat` with `O_NOFOLLOW`): a symlink planted in
//! a shared store is counted as a link, never followed.

use std::ffi::CStr;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use rustix::fs::{AtFlags, FileType, Mode, OFlags};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::store::{DirHandle, openat_beneath};

/// Bytes on disk and apparent bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// `st_blocks * 512` summed: what the disk holds.
    pub allocated_bytes: u64,
    /// `st_size` of the regular files summed.
    pub apparent_bytes: u64,
}

impl Usage {
    /// One file's, by lstat (a file that cannot be read counts nothing:
    /// it is garbage already, and `gc` says so when removing it fails).
    pub fn of_file(path: &std::path::Path) -> Usage {
        use std::os::unix::fs::MetadataExt;
        match std::fs::symlink_metadata(path) {
            Ok(m) => Usage { allocated_bytes: m.blocks() * 512, apparent_bytes: if m.is_file() { m.len() } else { 0 } },
            Err(_) => Usage::default(),
        }
    }
}

impl std::ops::AddAssign for Usage {
    fn add_assign(&mut self, o: Usage) {
        self.allocated_bytes += o.allocated_bytes;
        self.apparent_bytes += o.apparent_bytes;
    }
}

impl std::iter::Sum for Usage {
    fn sum<I: Iterator<Item = Usage>>(it: I) -> Usage {
        let mut t = Usage::default();
        for u in it {
            t += u;
        }
        t
    }
}

fn of_stat(st: &rustix::fs::Stat) -> Usage {
    let regular = FileType::from_raw_mode(st.st_mode) == FileType::RegularFile;
    Usage {
        allocated_bytes: (st.st_blocks as u64).saturating_mul(512),
        apparent_bytes: if regular { st.st_size as u64 } else { 0 },
    }
}

/// Deep enough for anything sharedloop stores (a layer directory, a
/// staging tree of an import); deeper is refused rather than followed.
const MAX_DEPTH: usize = 64;

/// The usage of `name` in the directory `dir` (at `path`, for errors).
fn usage_at(dir: &impl AsFd, name: &CStr, path: &Path, depth: usize) -> Result<Usage> {
    let st = rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(|e| Error::sys("stat", path, e))?;
    let mut u = of_stat(&st);
    if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
        return Ok(u);
    }
    if depth >= MAX_DEPTH {
        return Err(Error::damaged(path, format!("more than {MAX_DEPTH} directory levels, not counted")));
    }
    let sub: OwnedFd = rustix::fs::openat(dir, name, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::sys("open", path, e))?;
    let mut names = Vec::new();
    for ent in rustix::fs::Dir::read_from(&sub).map_err(|e| Error::sys("read directory", path, e))? {
        let ent = ent.map_err(|e| Error::sys("read directory", path, e))?;
        let n = ent.file_name();
        if n != c"." && n != c".." {
            names.push(n.to_owned());
        }
    }
    for n in names {
        let p = path.join(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(n.to_bytes()));
        match usage_at(&sub, &n, &p, depth + 1) {
            Ok(x) => u += x,
            // Removed while we walked: it occupies nothing now.
            Err(e) if e.errno() == Some(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(u)
}

/// The usage of `rel` (`sub/name`, e.g. `layers/<hex>`, `uppers/u.img`,
/// `tmp/<staging>`) of a store directory: the one place sizes come from.
pub fn usage_beneath(h: &DirHandle, rel: &str) -> Result<Usage> {
    let (sub, name) = rel.rsplit_once('/').unwrap_or((".", rel));
    let path = h.path.join(rel);
    let dir = openat_beneath(&h.fd, &h.path, sub, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
    let cname = std::ffi::CString::new(name).map_err(|_| Error::Internal(format!("{name:?}: NUL in a file name")))?;
    usage_at(&dir, &cname, &path, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn stat(p: &Path) -> Usage {
        let m = std::fs::symlink_metadata(p).unwrap();
        Usage { allocated_bytes: m.blocks() * 512, apparent_bytes: if m.is_file() { m.size() } else { 0 } }
    }

    /// Allocated and apparent bytes of a tree as stat(2) gives them, a
    /// sparse file counted by its blocks, a symlink as a link (its
    /// target, however big, not counted), a subdirectory walked.
    #[test]
    fn counts_what_stat_says_and_never_follows_links() {
        let d = std::env::temp_dir().join(format!("sl-usage-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let layer = d.join("layers/x");
        std::fs::create_dir_all(layer.join("sub")).unwrap();
        std::fs::write(layer.join("data"), vec![7u8; 64 << 10]).unwrap();
        let sparse = std::fs::File::create(layer.join("sparse")).unwrap();
        sparse.set_len(16 << 20).unwrap();
        drop(sparse);
        std::fs::write(layer.join("sub/small"), b"abc").unwrap();
        let big = d.join("outside");
        std::fs::write(&big, vec![1u8; 256 << 10]).unwrap();
        std::os::unix::fs::symlink(&big, layer.join("link")).unwrap();

        let fd = rustix::fs::open(&d, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).unwrap();
        let h = DirHandle { path: d.clone(), fd };
        let got = usage_beneath(&h, "layers/x").unwrap();
        let want: Usage = ["", "data", "sparse", "sub", "sub/small", "link"].iter().map(|p| stat(&layer.join(p))).sum();
        assert_eq!(got, want);
        assert_eq!(got.apparent_bytes, (64 << 10) + (16 << 20) + 3);
        assert!(got.allocated_bytes < (1 << 20), "the sparse file counts its blocks, the link not its target: {got:?}");
        assert_eq!(usage_beneath(&h, "layers/x/sparse").unwrap(), stat(&layer.join("sparse")));
        assert_eq!(usage_beneath(&h, "layers/x/link").unwrap(), stat(&layer.join("link")));
        let e = usage_beneath(&h, "layers/missing").unwrap_err();
        assert_eq!(e.errno(), Some(rustix::io::Errno::NOENT), "{e}");
        assert!(e.to_string().contains(&d.join("layers/missing").display().to_string()), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
