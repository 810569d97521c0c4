//! A directory tree (an unpacked layer in overlayfs form) into the writer:
//! the walk `add` uses (pre-order, sorted, sockets refused), each file's
//! content read once, hard links by (device, inode).

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use super::{Entry, Kind, Meta, Writer};
use crate::error::{Error, Result};
use crate::image::walk::walk;
use crate::image::xattr::read_xattrs;

/// Writes the erofs image of `dir` to `out`; returns its size in bytes.
pub fn write_dir(dir: &Path, out: &Path, uuid: [u8; 16], lz4: bool) -> Result<u64> {
    let mut w = Writer::create(out, uuid)?;
    w.compress_lz4(lz4);
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    walk(dir, |e| {
        e.refuse_socket()?;
        let rel = e.rel.as_os_str().as_bytes();
        if let Some(key) = e.link_key() {
            if let Some(first) = links.get(&key) {
                let entry = Entry {
                    path: rel,
                    kind: Kind::HardLink(first),
                    meta: Meta::default(),
                };
                return w.add(&entry, &mut std::io::empty());
            }
            links.insert(key, rel.to_vec());
        }
        let m = e.meta;
        let meta = Meta {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec() as u32,
            xattrs: read_xattrs(e.path)?,
        };
        let ft = m.file_type();
        let dev = (rustix::fs::major(m.rdev()), rustix::fs::minor(m.rdev()));
        let target;
        let kind = if ft.is_dir() {
            Kind::Dir
        } else if ft.is_file() {
            let mut f =
                std::fs::File::open(e.path).map_err(|err| Error::io("open", e.path, &err))?;
            // The size the walk saw: a file that changes under the walk
            // ends short (refused) or has its first `size` bytes taken.
            let entry = Entry {
                path: rel,
                kind: Kind::File { size: m.len() },
                meta,
            };
            return w.add(&entry, &mut f);
        } else if ft.is_symlink() {
            target = std::fs::read_link(e.path)
                .map_err(|err| Error::io("read symlink", e.path, &err))?;
            Kind::Symlink(target.as_os_str().as_bytes())
        } else if ft.is_char_device() {
            Kind::CharDev {
                major: dev.0,
                minor: dev.1,
            }
        } else if ft.is_block_device() {
            Kind::BlockDev {
                major: dev.0,
                minor: dev.1,
            }
        } else {
            Kind::Fifo
        };
        w.add(
            &Entry {
                path: rel,
                kind,
                meta,
            },
            &mut std::io::empty(),
        )
    })?;
    w.finish()
}
