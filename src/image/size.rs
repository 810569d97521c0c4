//! Sizing: what one walk of the tree says about the image to build. The
//! size and inode count are estimated from the content (data, directory
//! and xattr blocks, inodes) with headroom; the builders retry once at
//! twice the size if the estimate was short. The walk also gives the
//! newest mtime and a fingerprint of names and metadata, so that the same
//! tree gives the same image, and the top directory's attributes, which
//! mke2fs does not copy.

use std::collections::HashSet;
use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use sha2::{Digest as _, Sha256};

use super::walk::{Entry, walk};
use super::xattr::{Xattrs, read_xattrs};
use crate::error::{Error, Result};

pub(super) const BLOCK: u64 = 4096;
pub(super) const MIB: u64 = 1 << 20;
/// mkfs.xfs (xfsprogs 6.x) refuses smaller filesystems.
pub(super) const XFS_MIN: u64 = 300 * MIB;
/// The log mkfs.xfs 6.x creates on a small filesystem.
const XFS_LOG: u64 = 64 * MIB;

/// What a walk of the tree says about the image to build.
#[derive(Clone, Debug)]
pub(super) struct Plan {
    /// ext4 image size.
    pub(super) bytes: u64,
    pub(super) inodes: u64,
    /// Data and metadata blocks the content needs, before filesystem overhead.
    content: u64,
    /// Newest mtime in the tree: the image's own timestamps, so that the
    /// same tree gives the same image.
    pub(super) newest: i64,
    /// Hash of names and metadata: the image UUID and hash seed.
    pub(super) fingerprint: [u8; 32],
    pub(super) root: RootAttrs,
    /// mke2fs creates lost+found; only keep it if the tree has one.
    pub(super) has_lost_found: bool,
}

#[derive(Clone, Debug, Default)]
pub(super) struct RootAttrs {
    pub(super) mode: u32,
    pub(super) uid: u32,
    pub(super) gid: u32,
    pub(super) mtime: i64,
}

impl Plan {
    pub(super) fn doubled(&self) -> Plan {
        Plan {
            bytes: self.bytes * 2,
            inodes: self.inodes * 2,
            content: self.content * 2,
            ..self.clone()
        }
    }

    pub(super) fn xfs_bytes(&self) -> u64 {
        let raw = (self.content + self.inodes * 512) * 110 / 100 + XFS_LOG + 16 * MIB;
        round_up(raw, MIB).max(XFS_MIN)
    }
}

#[derive(Default)]
struct PlanAcc {
    content: u64,
    entries: u64,
    seen: HashSet<(u64, u64)>,
    newest: i64,
    fp: Sha256,
    root: RootAttrs,
    has_lost_found: bool,
}

pub(super) fn plan(dir: &Path) -> Result<Plan> {
    let mut acc = PlanAcc::default();
    walk(dir, |e| acc.add(e))?;
    Ok(acc.finish())
}

impl PlanAcc {
    fn add(&mut self, e: &Entry) -> Result<()> {
        e.refuse_socket()?;
        let m = e.meta;
        self.entries += 1;
        self.newest = self.newest.max(m.mtime());
        if e.is_root() {
            self.root = RootAttrs {
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                mtime: m.mtime(),
            };
            self.has_lost_found = e.children.iter().any(|c| c == "lost+found");
        }
        let xattrs = read_xattrs(e.path)?;
        let target = if m.file_type().is_symlink() {
            std::fs::read_link(e.path)
                .map_err(|err| Error::io("read symlink", e.path, &err))?
                .into_os_string()
        } else {
            OsString::new()
        };
        self.fingerprint(e, &xattrs, &target);
        if e.link_key().is_some_and(|k| !self.seen.insert(k)) {
            return Ok(());
        }
        self.content += xattr_bytes(&xattrs) + data_bytes(e, target.len());
        Ok(())
    }

    fn fingerprint(&mut self, e: &Entry, xattrs: &Xattrs, target: &OsStr) {
        let m = e.meta;
        let mut field = |b: &[u8]| {
            self.fp.update((b.len() as u64).to_le_bytes());
            self.fp.update(b);
        };
        field(e.rel.as_os_str().as_bytes());
        for n in [
            u64::from(m.mode()),
            u64::from(m.uid()),
            u64::from(m.gid()),
            m.len(),
            m.mtime() as u64,
            m.rdev(),
        ] {
            field(&n.to_le_bytes());
        }
        field(target.as_bytes());
        for (n, v) in xattrs {
            field(n);
            field(v);
        }
    }

    fn finish(self) -> Plan {
        let inodes = self.entries + self.entries / 10 + 64;
        let raw = (self.content + inodes * 256) * 105 / 100 + 16 * MIB;
        Plan {
            bytes: round_up(raw, MIB),
            inodes,
            content: self.content,
            newest: self.newest.max(1),
            fingerprint: self.fp.finalize().into(),
            root: self.root,
            has_lost_found: self.has_lost_found,
        }
    }
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// Blocks for an inode's data: file blocks plus one mapping block per MiB;
/// directory blocks from the names (ext4 dirents are 8 bytes plus the name
/// padded to 4, blocks taken 3/4 full, one more for the htree index);
/// symlink targets over 60 bytes leave the inode for a block.
fn data_bytes(e: &Entry, target_len: usize) -> u64 {
    let m = e.meta;
    if m.is_file() {
        return round_up(m.len(), BLOCK) + BLOCK * m.len().div_ceil(MIB);
    }
    if m.is_dir() {
        let n = e.children.len() as u64;
        let names: u64 = e
            .children
            .iter()
            .map(|c| 8 + round_up(c.len() as u64, 4))
            .sum();
        let blocks = n.div_ceil(100).max((names * 4 / 3).div_ceil(BLOCK)).max(1);
        return BLOCK * if blocks > 1 { blocks + 1 } else { 1 };
    }
    if m.file_type().is_symlink() && target_len > 60 {
        return BLOCK;
    }
    0
}

/// In-inode xattr space with 256-byte inodes is about 92 bytes; past that
/// ext4 needs an xattr block.
fn xattr_bytes(xattrs: &Xattrs) -> u64 {
    if xattrs.is_empty() {
        return 0;
    }
    let need: u64 = 4 + xattrs
        .iter()
        .map(|(n, v)| 16 + round_up(n.len() as u64, 4) + round_up(v.len() as u64, 4))
        .sum::<u64>();
    if need <= 92 {
        0
    } else {
        round_up(need + 32, BLOCK)
    }
}
