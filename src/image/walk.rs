//! The tree walk the diff tar and the sizing share: pre-order, children
//! sorted by byte-wise name, symlinks not followed (only the top directory
//! may be one), iterative so a deep tree cannot overflow the stack. Both
//! passes see the same entries in the same order, and both refuse a
//! socket, which a layer cannot hold.

use std::ffi::OsString;
use std::fs::Metadata;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use rustix::io::Errno;

use crate::error::{Error, Result};

pub(super) fn check_dir(dir: &Path) -> Result<()> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::io("layer directory", dir, &e))?;
    if !meta.is_dir() {
        return Err(Error::sys("layer directory", dir, Errno::NOTDIR));
    }
    Ok(())
}

/// One entry of a walk; `rel` is empty for the top directory itself.
pub(super) struct Entry<'a> {
    pub(super) rel: &'a Path,
    pub(super) path: &'a Path,
    pub(super) meta: &'a Metadata,
    /// Names in the directory, in walk order (empty for non-directories).
    pub(super) children: &'a [OsString],
}

impl Entry<'_> {
    pub(super) fn is_root(&self) -> bool {
        self.rel.as_os_str().is_empty()
    }
    pub(super) fn is_whiteout(&self) -> bool {
        self.meta.file_type().is_char_device() && self.meta.rdev() == 0
    }
    /// Hard-link identity, for non-directories that have other links.
    pub(super) fn link_key(&self) -> Option<(u64, u64)> {
        (!self.meta.is_dir() && self.meta.nlink() > 1).then(|| (self.meta.dev(), self.meta.ino()))
    }
    pub(super) fn refuse_socket(&self) -> Result<()> {
        if self.meta.file_type().is_socket() {
            return Err(Error::sys(
                "refusing socket (a layer cannot hold one)",
                self.path,
                Errno::OPNOTSUPP,
            ));
        }
        Ok(())
    }
}

/// Pre-order walk, children sorted by byte-wise name, symlinks not
/// followed (only `dir` itself may be one). Iterative, so a deep tree cannot
/// overflow the stack.
pub(super) fn walk(dir: &Path, mut visit: impl FnMut(&Entry) -> Result<()>) -> Result<()> {
    check_dir(dir)?;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        if crate::interrupt::interrupted() {
            return Err(Error::Interrupted);
        }
        let path = if rel.as_os_str().is_empty() {
            dir.to_path_buf()
        } else {
            dir.join(&rel)
        };
        let meta = if rel.as_os_str().is_empty() {
            std::fs::metadata(&path)
        } else {
            std::fs::symlink_metadata(&path)
        }
        .map_err(|e| Error::io("stat", &path, &e))?;
        let children = if meta.is_dir() {
            sorted_children(&path)?
        } else {
            Vec::new()
        };
        visit(&Entry {
            rel: &rel,
            path: &path,
            meta: &meta,
            children: &children,
        })?;
        stack.extend(children.iter().rev().map(|c| rel.join(c)));
    }
    Ok(())
}

pub(super) fn sorted_children(dir: &Path) -> Result<Vec<OsString>> {
    let err = |e: &io::Error| Error::io("read directory", dir, e);
    let mut names = Vec::new();
    for ent in std::fs::read_dir(dir).map_err(|e| err(&e))? {
        names.push(ent.map_err(|e| err(&e))?.file_name());
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}
