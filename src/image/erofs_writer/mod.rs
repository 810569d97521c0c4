//! An erofs image writer, in-process: entries in (a path, its type and
//! metadata, a file's content as a reader), an uncompressed erofs image
//! out, with no staging tree and no external mkfs. It exists because
//! Debian 12's mkfs.erofs 1.5 cannot store 255-byte names and mkfs tools
//! drop nanosecond mtimes (issue 11).
//!
//! # Layout decisions
//!
//! ```text
//! block 0          zeros, the superblock at 1024 (crc32c checksummed)
//! blocks 1..D      file data, streamed in the order the entries come
//! blocks D..M      directory blocks and long symlinks, written at the end
//! blocks M..       the metadata area (meta_blkaddr = M): inodes, each
//!                  followed by its xattrs and its inline tail
//! ```
//!
//! - **Data first, metadata last.** A file's content is copied once, as it
//!   is read, to the next free blocks; only metadata stays in memory (the
//!   tree of names, modes, owners, times and encoded xattrs). Inode sizes
//!   and positions are known only once every entry is in, so the metadata
//!   area goes after the data: a nid counts 32-byte slots from
//!   `meta_blkaddr`, so nothing written earlier depends on where it lands.
//! - **Extended (64-byte) inodes** hold 32-bit uid/gid and nlink, a
//!   64-bit size (files over 4 GiB) and the mtime with its nanoseconds, on
//!   every kernel with erofs. **Compact (32-byte) inodes** hold 16-bit
//!   ids and nlink, a 32-bit size, and before 6.x no mtime of their own
//!   (the superblock's build time stands for it): an inode gets one only
//!   when its values fit and its mtime is exactly the build time, which
//!   in a reproducible image (every mtime the same) is most of them.
//! - **Tail packing.** A file's last partial block is stored right after
//!   its inode and xattrs (`FLAT_INLINE`) when inode, xattrs and tail fit
//!   in one block, so small files cost no data block. The tail must not
//!   cross a block boundary, so inodes are placed best fit: each goes into
//!   the metadata block with the least room that still holds it and its
//!   inline part, else into a new block (an image of 4,000 random-sized
//!   files came out 16 KiB smaller than mkfs.erofs 1.5's). Whether a
//!   file's tail is inline is decided when its entry arrives (it depends
//!   only on its xattrs and size): its full blocks are streamed to the
//!   data area at once and the tail goes to an unlinked spill file until
//!   the metadata area is written. Otherwise the tail is padded to a block
//!   after the full ones (`FLAT_PLAIN`). Directories and symlinks follow
//!   the same rule. File sizes that are a multiple of 4096 are always
//!   `FLAT_PLAIN` (`FLAT_INLINE` would take the last full block as inline).
//! - **Sparse files** are stored in full (erofs' flat layouts have no
//!   holes); all-zero blocks are skipped with a seek, so the image file
//!   itself is sparse on disk and a 5 GiB hole costs no space. Chunk-based
//!   inodes with null chunks would keep the holes in the format too.
//! - **Directories** are blocks of 12-byte dirents (nid, name offset, file
//!   type) followed by unterminated names, all names of the directory
//!   ("." and ".." included) sorted bytewise across blocks, as the kernel's
//!   binary-search lookup needs. A directory's size ends at its last name.
//! - **Xattrs** are inline in the inode body (no shared xattr area), name
//!   prefixes replaced by erofs' indexes: `user.`, `trusted.` (so
//!   `trusted.overlay.*`), `security.` (so `security.capability`),
//!   `system.posix_acl_access`/`_default` and `lustre.`; any other
//!   namespace is refused, as erofs cannot store it. A value may be up to
//!   65535 bytes (the format's 16-bit length); a body may span blocks.
//! - **Hard links** are dirents naming the same inode; nlink is counted
//!   from the finished tree. Whiteouts (char 0/0) and opaque directories
//!   (`trusted.overlay.opaque`) are plain entries.
//! - **Deterministic**: the same entries give the same bytes. Inodes are
//!   taken breadth-first in name order (the root first, so at nid 0, as
//!   the 16-bit `root_nid` needs), placed best fit, the UUID is the caller's, the
//!   build time is the newest mtime; nothing reads the clock.
//! - A path given twice replaces the first (as a tar does); a directory
//!   given again keeps its children. Parent directories never given are
//!   made with mode 0755, owner 0:0 and mtime 0.

mod dir;
pub mod format;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
pub use dir::write_dir;
use format::{BLOCK, EXTENDED_INODE, SLOT};

/// What an entry is, with what that type needs.
#[derive(Clone, Debug)]
pub enum Kind<'a> {
    Dir,
    /// A regular file of `size` bytes, read from the reader `add` gets.
    File {
        size: u64,
    },
    Symlink(&'a [u8]),
    CharDev {
        major: u32,
        minor: u32,
    },
    BlockDev {
        major: u32,
        minor: u32,
    },
    Fifo,
    Socket,
    /// Another name for the (non-directory) entry at this path, given
    /// before; this entry's metadata is not used.
    HardLink(&'a [u8]),
}

/// An entry's metadata. `mode` holds the permission bits only (0o7777).
#[derive(Clone, Debug, Default)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Full names (`user.foo`, `trusted.overlay.opaque`) and values.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Clone, Debug)]
pub struct Entry<'a> {
    /// Relative to the image root, `/`-separated; "" or "." is the root.
    pub path: &'a [u8],
    pub kind: Kind<'a>,
    pub meta: Meta,
}

/// Longest symlink target readlink can return (PATH_MAX less the NUL).
pub const MAX_SYMLINK: usize = 4095;
const NAME_MAX: usize = 255;
const COPY_BUF: usize = 1 << 20;
const ROOT: usize = 0;

struct Node {
    /// Type and permission bits.
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nsec: u32,
    /// The encoded xattr body.
    xattrs: Vec<u8>,
    body: Body,
}

enum Body {
    Dir(BTreeMap<Vec<u8>, usize>),
    File {
        size: u64,
        blkaddr: u32,
        /// (offset in the spill file, length) of an inline tail.
        tail: Option<(u64, u32)>,
        /// LZ4-compressed: the full lcluster indexes (`blkaddr` is then
        /// the count of data blocks, as `i_u` holds it).
        zindex: Option<Vec<u8>>,
    },
    Symlink(Vec<u8>),
    Dev(u32),
    Special,
}

/// Writes one erofs image; `finish` completes it. Dropped unfinished, it
/// removes the partial image.
pub struct Writer {
    out: File,
    out_path: PathBuf,
    /// Inline tails of files, until the metadata area is written: an
    /// unlinked file, so nothing of it outlives the writer.
    tails: BufWriter<File>,
    tails_len: u64,
    nodes: Vec<Node>,
    /// The next free data block (block 0 is the superblock's).
    next_block: u64,
    uuid: [u8; 16],
    buf: Vec<u8>,
    /// Compress files with LZ4 where it saves blocks.
    lz4: bool,
    /// Some file was stored compressed: the superblock says so.
    lz4_used: bool,
    finished: bool,
}

/// One inode as the metadata area lays it out.
struct Placed {
    id: usize,
    nid: u64,
    size: u64,
    blkaddr: u32,
    nlink: u32,
    inline_len: usize,
    /// `CompressedFull`: `inline_len` is the map header and indexes (and
    /// the padding that aligns them to 8 bytes).
    compressed: bool,
}

impl Writer {
    /// Creates (or truncates) the image at `out`.
    pub fn create(out: &Path, uuid: [u8; 16]) -> Result<Self> {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(out)
            .map_err(|e| Error::io("create erofs image", out, &e))?;
        let mut tails_name = out.as_os_str().to_owned();
        tails_name.push(format!(".tails.{}", std::process::id()));
        let tails_path = PathBuf::from(tails_name);
        let tails = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&tails_path)
            .map_err(|e| Error::io("create erofs tail spill file", &tails_path, &e))?;
        std::fs::remove_file(&tails_path)
            .map_err(|e| Error::io("unlink erofs tail spill file", &tails_path, &e))?;
        let root = Node {
            mode: 0o040755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: Vec::new(),
            body: Body::Dir(BTreeMap::new()),
        };
        Ok(Writer {
            out: file,
            out_path: out.to_path_buf(),
            tails: BufWriter::new(tails),
            tails_len: 0,
            nodes: vec![root],
            next_block: 1,
            uuid,
            buf: vec![0; COPY_BUF],
            lz4: false,
            lz4_used: false,
            finished: false,
        })
    }

    /// Compress regular files with LZ4 from now on (see "Compression").
    pub fn compress_lz4(&mut self, on: bool) {
        self.lz4 = on;
    }

    fn refused(&self, path: &[u8], why: impl Into<String>) -> Error {
        Error::refused(
            format!(
                "erofs image {}: entry {:?}",
                self.out_path.display(),
                String::from_utf8_lossy(path)
            ),
            why,
        )
    }

    /// Adds one entry; a regular file's `size` bytes are read from `data`
    /// (and no more), other types do not read it.
    pub fn add(&mut self, e: &Entry, data: &mut dyn Read) -> Result<()> {
        let comps = split_path(e.path).map_err(|why| self.refused(e.path, why))?;
        if e.meta.mode & !0o7777 != 0 {
            return Err(self.refused(
                e.path,
                format!("mode {:o} has bits beyond 07777", e.meta.mode),
            ));
        }
        if e.meta.mtime_nsec > 999_999_999 {
            return Err(self.refused(
                e.path,
                format!("mtime nanoseconds {} (0 to 999999999)", e.meta.mtime_nsec),
            ));
        }
        let xattrs = encode_xattrs(&e.meta.xattrs).map_err(|why| self.refused(e.path, why))?;
        let Some((name, parents)) = comps.split_last() else {
            // The root itself.
            if !matches!(e.kind, Kind::Dir) {
                return Err(self.refused(e.path, "the root must be a directory"));
            }
            self.set_meta(ROOT, &e.meta, xattrs);
            return Ok(());
        };
        let parent = self.make_parents(e.path, parents)?;
        let existing = self.child(parent, name);
        let id = match &e.kind {
            Kind::HardLink(target) => self.resolve_link(e.path, target)?,
            Kind::Dir => {
                if let Some(id) = existing
                    && matches!(self.nodes[id].body, Body::Dir(_))
                {
                    self.set_meta(id, &e.meta, xattrs);
                    return Ok(());
                }
                self.push(0o040000, &e.meta, xattrs, Body::Dir(BTreeMap::new()))
            }
            Kind::File { size } => {
                let body = self.stream_file(e.path, *size, xattrs.len(), data)?;
                self.push(0o100000, &e.meta, xattrs, body)
            }
            Kind::Symlink(t) => {
                if t.is_empty() || t.len() > MAX_SYMLINK {
                    return Err(self.refused(
                        e.path,
                        format!("symlink target of {} bytes (1 to {MAX_SYMLINK})", t.len()),
                    ));
                }
                self.push(0o120000, &e.meta, xattrs, Body::Symlink(t.to_vec()))
            }
            Kind::CharDev { major, minor } | Kind::BlockDev { major, minor } => {
                if *major > format::MAX_MAJOR || *minor > format::MAX_MINOR {
                    return Err(self.refused(
                        e.path,
                        format!("device {major}:{minor} beyond erofs' 12-bit major, 20-bit minor"),
                    ));
                }
                let t = if matches!(e.kind, Kind::CharDev { .. }) {
                    0o020000
                } else {
                    0o060000
                };
                self.push(
                    t,
                    &e.meta,
                    xattrs,
                    Body::Dev(format::encode_dev(*major, *minor)),
                )
            }
            Kind::Fifo => self.push(0o010000, &e.meta, xattrs, Body::Special),
            Kind::Socket => self.push(0o140000, &e.meta, xattrs, Body::Special),
        };
        let Body::Dir(children) = &mut self.nodes[parent].body else {
            unreachable!()
        };
        children.insert(name.to_vec(), id);
        Ok(())
    }

    fn set_meta(&mut self, id: usize, m: &Meta, xattrs: Vec<u8>) {
        let n = &mut self.nodes[id];
        n.mode = (n.mode & 0o170000) | m.mode;
        (n.uid, n.gid, n.mtime, n.mtime_nsec, n.xattrs) =
            (m.uid, m.gid, m.mtime, m.mtime_nsec, xattrs);
    }

    fn push(&mut self, ftype: u32, m: &Meta, xattrs: Vec<u8>, body: Body) -> usize {
        self.nodes.push(Node {
            mode: ftype | m.mode,
            uid: m.uid,
            gid: m.gid,
            mtime: m.mtime,
            mtime_nsec: m.mtime_nsec,
            xattrs,
            body,
        });
        self.nodes.len() - 1
    }

    fn child(&self, dir: usize, name: &[u8]) -> Option<usize> {
        match &self.nodes[dir].body {
            Body::Dir(c) => c.get(name).copied(),
            _ => None,
        }
    }

    /// The directory `parents` names, made (0755, 0:0, mtime 0) where missing.
    fn make_parents(&mut self, path: &[u8], parents: &[&[u8]]) -> Result<usize> {
        let mut cur = ROOT;
        for p in parents {
            cur = match self.child(cur, p) {
                Some(id) if matches!(self.nodes[id].body, Body::Dir(_)) => id,
                Some(_) => {
                    return Err(self.refused(
                        path,
                        format!(
                            "{:?} on its path is not a directory",
                            String::from_utf8_lossy(p)
                        ),
                    ));
                }
                None => {
                    let m = Meta {
                        mode: 0o755,
                        ..Meta::default()
                    };
                    let id = self.push(0o040000, &m, Vec::new(), Body::Dir(BTreeMap::new()));
                    let Body::Dir(c) = &mut self.nodes[cur].body else {
                        unreachable!()
                    };
                    c.insert(p.to_vec(), id);
                    id
                }
            };
        }
        Ok(cur)
    }

    fn resolve_link(&self, path: &[u8], target: &[u8]) -> Result<usize> {
        let comps = split_path(target)
            .map_err(|why| self.refused(path, format!("hard link target: {why}")))?;
        let mut cur = ROOT;
        for c in &comps {
            cur = self.child(cur, c).ok_or_else(|| {
                self.refused(
                    path,
                    format!(
                        "hard link to {:?}, not given before",
                        String::from_utf8_lossy(target)
                    ),
                )
            })?;
        }
        if matches!(self.nodes[cur].body, Body::Dir(_)) {
            return Err(self.refused(
                path,
                format!(
                    "hard link to directory {:?}",
                    String::from_utf8_lossy(target)
                ),
            ));
        }
        Ok(cur)
    }

    /// Copies a file's content: full blocks to the data area now, the tail
    /// to the spill file when it will be inline, else padded after them.
    fn stream_file(
        &mut self,
        path: &[u8],
        size: u64,
        xattr_len: usize,
        data: &mut dyn Read,
    ) -> Result<Body> {
        if self.lz4 && size > BLOCK {
            return self.stream_lz4(path, size, data);
        }
        let full = size / BLOCK;
        let tail = (size % BLOCK) as usize;
        let inline = tail > 0 && EXTENDED_INODE + xattr_len + tail <= BLOCK as usize;
        let nblocks = full + u64::from(tail > 0 && !inline);
        let blkaddr = if nblocks == 0 { 0 } else { self.next_block };
        if self.next_block + nblocks > u64::from(u32::MAX) {
            return Err(self.refused(path, "the image would pass erofs' 2^32 blocks (16 TiB)"));
        }
        let in_blocks = if inline { full * BLOCK } else { size };
        self.copy_blocks(path, data, blkaddr * BLOCK, in_blocks)?;
        self.next_block += nblocks;
        let tail_at = if inline {
            let mut t = vec![0u8; tail];
            self.read_exact(path, data, &mut t)?;
            let at = self.tails_len;
            self.tails
                .write_all(&t)
                .map_err(|e| Error::io("write erofs tail spill file", &self.out_path, &e))?;
            self.tails_len += tail as u64;
            Some((at, tail as u32))
        } else {
            None
        };
        Ok(Body::File {
            size,
            blkaddr: blkaddr as u32,
            tail: tail_at,
            zindex: None,
        })
    }

    /// A file in pclusters of up to 16 lclusters (64 KiB of input, aligned
    /// so every clusterofs is 0), each LZ4-compressed and kept so only if
    /// that saves a block, the compressed bytes at the end of its blocks
    /// (zero padding before them); else, and for all-zero input (left as
    /// holes, as uncompressed files keep them), its lclusters are PLAIN
    /// blocks. If nothing was kept compressed the blocks are exactly a
    /// `FLAT_PLAIN` file's and the file is stored as one.
    fn stream_lz4(&mut self, path: &[u8], size: u64, data: &mut dyn Read) -> Result<Body> {
        use format::Lcluster;
        let nlc = size.div_ceil(BLOCK);
        let start = self.next_block;
        if start + nlc > u64::from(u32::MAX) {
            return Err(self.refused(path, "the image would pass erofs' 2^32 blocks (16 TiB)"));
        }
        let mut index = Vec::with_capacity(nlc as usize * 8);
        let mut any = false;
        let mut buf = vec![0u8; (format::PCLUSTER_LCLUSTERS * BLOCK) as usize];
        let mut lc = 0u64;
        while lc < nlc {
            let k = format::PCLUSTER_LCLUSTERS.min(nlc - lc);
            let len = (k * BLOCK).min(size - lc * BLOCK) as usize;
            self.read_exact(path, data, &mut buf[..len])?;
            let at = self.next_block;
            let c = if buf[..len].chunks(BLOCK as usize).all(is_zero) {
                None
            } else {
                Some(lz4_flex::block::compress(&buf[..len]))
            };
            match c {
                Some(c) if (c.len() as u64).div_ceil(BLOCK) < k => {
                    let cb = (c.len() as u64).div_ceil(BLOCK);
                    let mut out = vec![0u8; (cb * BLOCK) as usize];
                    let pad = out.len() - c.len();
                    out[pad..].copy_from_slice(&c);
                    write_nonzero(&self.out, &out, at * BLOCK)
                        .map_err(|e| Error::io("write erofs image", &self.out_path, &e))?;
                    index.extend_from_slice(&format::lcluster_index(Lcluster::Head {
                        blkaddr: at as u32,
                    }));
                    for j in 1..k {
                        let d0 = if j == 1 {
                            cb as u16 | format::LI_D0_CBLKCNT
                        } else {
                            j as u16
                        };
                        index.extend_from_slice(&format::lcluster_index(Lcluster::NonHead {
                            d0,
                            next: (k - j) as u16,
                        }));
                    }
                    self.next_block += cb;
                    any = true;
                }
                _ => {
                    let padded = (k * BLOCK) as usize;
                    buf[len..padded].fill(0);
                    write_nonzero(&self.out, &buf[..padded], at * BLOCK)
                        .map_err(|e| Error::io("write erofs image", &self.out_path, &e))?;
                    for j in 0..k {
                        index.extend_from_slice(&format::lcluster_index(Lcluster::Plain {
                            blkaddr: (at + j) as u32,
                        }));
                    }
                    self.next_block += k;
                }
            }
            lc += k;
        }
        if !any {
            return Ok(Body::File {
                size,
                blkaddr: start as u32,
                tail: None,
                zindex: None,
            });
        }
        self.lz4_used = true;
        Ok(Body::File {
            size,
            blkaddr: (self.next_block - start) as u32,
            tail: None,
            zindex: Some(index),
        })
    }

    fn read_exact(&self, path: &[u8], data: &mut dyn Read, buf: &mut [u8]) -> Result<()> {
        data.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.refused(path, "content ends before its size")
            } else {
                Error::bad_image_io(
                    format!("read content of {:?}", String::from_utf8_lossy(path)),
                    &e,
                )
            }
        })
    }

    /// `n` bytes from `data` to the image at `at`, the last block padded
    /// with zeros; all-zero blocks are skipped (left as holes).
    fn copy_blocks(&mut self, path: &[u8], data: &mut dyn Read, at: u64, n: u64) -> Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        let r = (|| {
            let mut done = 0u64;
            while done < n {
                let len = (n - done).min(COPY_BUF as u64) as usize;
                self.read_exact(path, data, &mut buf[..len])?;
                let padded = len.div_ceil(BLOCK as usize) * BLOCK as usize;
                buf[len..padded].fill(0);
                write_nonzero(&self.out, &buf[..padded], at + done)
                    .map_err(|e| Error::io("write erofs image", &self.out_path, &e))?;
                done += len as u64;
            }
            Ok(())
        })();
        self.buf = buf;
        r
    }

    /// Lays out and writes directories, symlinks, the metadata area and the
    /// superblock. Returns the image size in bytes.
    pub fn finish(mut self) -> Result<u64> {
        let werr = |e: std::io::Error, p: &Path| Error::io("write erofs image", p, &e);
        // Breadth-first, in name order: the inode order, and each
        // directory's parent and nlink.
        let n = self.nodes.len();
        let mut order = vec![ROOT];
        let mut parent = vec![usize::MAX; n];
        let mut nlink = vec![0u32; n];
        parent[ROOT] = ROOT;
        nlink[ROOT] = 2;
        let mut i = 0;
        while i < order.len() {
            let d = order[i];
            i += 1;
            let Body::Dir(children) = &self.nodes[d].body else {
                continue;
            };
            for &c in children.values() {
                if matches!(self.nodes[c].body, Body::Dir(_)) {
                    nlink[d] += 1;
                    nlink[c] = 2;
                    parent[c] = d;
                    order.push(c);
                } else {
                    if nlink[c] == 0 {
                        order.push(c);
                    }
                    nlink[c] += 1;
                }
            }
        }
        // Sizes, layouts and data blocks of directories and symlinks.
        let mut dirs: Vec<Vec<(usize, usize)>> = Vec::new();
        let mut dir_of = vec![usize::MAX; n];
        let mut placed = Vec::with_capacity(order.len());
        let mut extra_block = self.next_block;
        let mut newest = (i64::MIN, 0u32);
        for &id in &order {
            let node = &self.nodes[id];
            newest = newest.max((node.mtime, node.mtime_nsec));
            let xlen = node.xattrs.len();
            let mut p = Placed {
                id,
                nid: 0,
                size: 0,
                blkaddr: 0,
                nlink: nlink[id],
                inline_len: 0,
                compressed: false,
            };
            let mem_size = match &node.body {
                Body::Dir(children) => {
                    let blocks =
                        format::pack_dir(dir_names(children, id, parent[id]).map(|(name, _)| name));
                    let size = format::dir_size(&blocks);
                    dir_of[id] = dirs.len();
                    dirs.push(blocks);
                    Some(size)
                }
                Body::Symlink(t) => Some(t.len() as u64),
                Body::File {
                    size,
                    blkaddr,
                    tail,
                    zindex,
                } => {
                    (p.size, p.blkaddr) = (*size, *blkaddr);
                    p.inline_len = tail.map_or(0, |t| t.1 as usize);
                    if let Some(z) = zindex {
                        p.compressed = true;
                        p.inline_len = zmeta_pad(xlen) + format::ZMAP_HEADER + z.len();
                    }
                    None
                }
                Body::Dev(rdev) => {
                    p.blkaddr = *rdev;
                    None
                }
                Body::Special => None,
            };
            if let Some(size) = mem_size {
                let tail = (size % BLOCK) as usize;
                let inline = tail > 0 && EXTENDED_INODE + xlen + tail <= BLOCK as usize;
                let nblocks = size / BLOCK + u64::from(tail > 0 && !inline);
                p.size = size;
                p.inline_len = if inline { tail } else { 0 };
                if nblocks > 0 {
                    p.blkaddr = u32::try_from(extra_block).map_err(|_| self.too_big())?;
                    extra_block += nblocks;
                }
            }
            placed.push(p);
        }
        // The metadata area: an inode with its inline part never crosses a
        // block boundary, so each goes, best fit, into the block with the
        // least room that still holds it (ties: the lowest), else a new
        // one; an inode whose xattrs pass a block starts its own blocks.
        // Breadth-first order and the root first keep the root at nid 0.
        let build_time = if newest.0 < 0 {
            (0, 0)
        } else {
            (newest.0 as u64, newest.1)
        };
        let mut inodes = Vec::with_capacity(placed.len());
        let mut nid_of = vec![0u64; n];
        let mut free: BTreeSet<(u64, u64)> = BTreeSet::new(); // (room, block)
        let mut meta_blocks = 0u64;
        for (ino, p) in placed.iter_mut().enumerate() {
            let node = &self.nodes[p.id];
            let inode = format::Inode {
                layout_inline: p.inline_len > 0 && !p.compressed,
                compressed: p.compressed,
                xattr_len: node.xattrs.len(),
                mode: node.mode,
                size: p.size,
                i_u: p.blkaddr,
                ino: ino as u32 + 1,
                uid: node.uid,
                gid: node.gid,
                mtime: node.mtime,
                mtime_nsec: node.mtime_nsec,
                nlink: p.nlink,
            };
            let compact = format::fits_compact(&inode, build_time);
            let isize = if compact {
                format::COMPACT_INODE
            } else {
                EXTENDED_INODE
            };
            inodes.push((inode, compact));
            let need = (isize + node.xattrs.len() + p.inline_len) as u64;
            let need = need.div_ceil(SLOT) * SLOT;
            let (pos, left) = if need <= BLOCK {
                match free.range((need, 0)..).next().copied() {
                    Some((room, blk)) => {
                        free.remove(&(room, blk));
                        (blk * BLOCK + BLOCK - room, (room - need, blk))
                    }
                    None => {
                        meta_blocks += 1;
                        ((meta_blocks - 1) * BLOCK, (BLOCK - need, meta_blocks - 1))
                    }
                }
            } else {
                let start = meta_blocks * BLOCK;
                meta_blocks += need.div_ceil(BLOCK);
                (start, (meta_blocks * BLOCK - start - need, meta_blocks - 1))
            };
            if left.0 >= format::COMPACT_INODE as u64 {
                free.insert(left);
            }
            p.nid = pos / SLOT;
            nid_of[p.id] = p.nid;
        }
        let meta_blkaddr = extra_block;
        let blocks = meta_blkaddr + meta_blocks;
        let blocks = u32::try_from(blocks).map_err(|_| self.too_big())?;
        // Directory blocks and long symlinks.
        for p in &placed {
            let bytes = match &self.nodes[p.id].body {
                Body::Dir(children) => dir_bytes(
                    children,
                    p.id,
                    parent[p.id],
                    &dirs[dir_of[p.id]],
                    &nid_of,
                    &self.nodes,
                ),
                Body::Symlink(t) => t.clone(),
                _ => continue,
            };
            let in_blocks = bytes.len() - p.inline_len;
            if in_blocks > 0 {
                let mut b = bytes[..in_blocks].to_vec();
                b.resize(in_blocks.div_ceil(BLOCK as usize) * BLOCK as usize, 0);
                write_nonzero(&self.out, &b, u64::from(p.blkaddr) * BLOCK)
                    .map_err(|e| werr(e, &self.out_path))?;
            }
        }
        // The metadata area, in order.
        self.tails
            .flush()
            .map_err(|e| Error::io("write erofs tail spill file", &self.out_path, &e))?;
        let tails = self.tails.get_ref();
        let mut meta = Vec::with_capacity(COPY_BUF);
        let meta_base = meta_blkaddr * BLOCK;
        let mut meta_at = meta_base;
        // Bytes of the metadata area produced so far, flushed or not.
        let mut written = 0u64;
        // Written in the order of their places; numbered (i_ino) in the
        // breadth-first order.
        let mut by_pos: Vec<usize> = (0..placed.len()).collect();
        by_pos.sort_by_key(|&i| placed[i].nid);
        for ino in by_pos {
            let p = &placed[ino];
            let node = &self.nodes[p.id];
            let start = p.nid * SLOT;
            meta.resize(meta.len() + (start - written) as usize, 0);
            match &inodes[ino] {
                (inode, true) => meta.extend_from_slice(&format::compact_inode(inode)),
                (inode, false) => meta.extend_from_slice(&format::extended_inode(inode)),
            }
            meta.extend_from_slice(&node.xattrs);
            if p.inline_len > 0 {
                match &node.body {
                    Body::File {
                        zindex: Some(z), ..
                    } => {
                        meta.resize(meta.len() + zmeta_pad(node.xattrs.len()), 0);
                        meta.extend_from_slice(&format::zmap_header());
                        meta.extend_from_slice(z);
                    }
                    Body::File {
                        tail: Some((off, len)),
                        ..
                    } => {
                        let at = meta.len();
                        meta.resize(at + *len as usize, 0);
                        tails.read_exact_at(&mut meta[at..], *off).map_err(|e| {
                            Error::io("read erofs tail spill file", &self.out_path, &e)
                        })?;
                    }
                    Body::Symlink(t) => meta.extend_from_slice(&t[t.len() - p.inline_len..]),
                    Body::Dir(children) => {
                        let blocks = &dirs[dir_of[p.id]];
                        let last = blocks.len() - 1;
                        let skip: usize = blocks[..last].iter().map(|b| b.0).sum();
                        let entries: Vec<_> = dir_names(children, p.id, parent[p.id])
                            .skip(skip)
                            .map(|(name, id)| {
                                (name, nid_of[id], format::file_type(self.nodes[id].mode))
                            })
                            .collect();
                        meta.extend_from_slice(&format::dir_block(&entries));
                    }
                    _ => unreachable!("only files, directories and symlinks have tails"),
                }
            }
            written = meta_at - meta_base + meta.len() as u64;
            if meta.len() >= COPY_BUF {
                self.out
                    .write_all_at(&meta, meta_at)
                    .map_err(|e| werr(e, &self.out_path))?;
                meta_at += meta.len() as u64;
                meta.clear();
            }
        }
        meta.resize((u64::from(blocks) * BLOCK - meta_at) as usize, 0);
        self.out
            .write_all_at(&meta, meta_at)
            .map_err(|e| werr(e, &self.out_path))?;
        let (bt, btn) = build_time;
        let sb = format::Superblock {
            root_nid: nid_of[ROOT] as u16,
            inos: placed.len() as u64,
            build_time: bt,
            build_time_nsec: btn,
            blocks,
            meta_blkaddr: meta_blkaddr as u32,
            uuid: self.uuid,
            lz4: self.lz4_used,
        };
        self.out
            .write_all_at(&format::superblock_block(&sb), 0)
            .map_err(|e| werr(e, &self.out_path))?;
        let size = u64::from(blocks) * BLOCK;
        // Skipped zero blocks at the end of the data are holes: the length
        // is set, not written.
        self.out
            .set_len(size)
            .map_err(|e| Error::io("size erofs image", &self.out_path, &e))?;
        self.finished = true;
        Ok(size)
    }

    fn too_big(&self) -> Error {
        Error::refused(
            format!("erofs image {}", self.out_path.display()),
            "it would pass erofs' 2^32 blocks (16 TiB)",
        )
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_file(&self.out_path);
        }
    }
}

/// A directory's names in dirent order: its children and "." and "..",
/// sorted bytewise, with the inode each names.
fn dir_names<'a>(
    children: &'a BTreeMap<Vec<u8>, usize>,
    me: usize,
    parent: usize,
) -> impl Iterator<Item = (&'a [u8], usize)> + 'a {
    let dots: [(&'a [u8], usize); 2] = [(b".", me), (b"..", parent)];
    let mut dots = dots.into_iter().peekable();
    let mut kids = children.iter().map(|(k, &v)| (&k[..], v)).peekable();
    std::iter::from_fn(move || match (dots.peek(), kids.peek()) {
        (Some(d), Some(k)) if d.0 < k.0 => dots.next(),
        (Some(_), Some(_)) | (None, Some(_)) => kids.next(),
        (Some(_), None) => dots.next(),
        (None, None) => None,
    })
}

/// A directory's content: its blocks, every one but the last padded.
fn dir_bytes(
    children: &BTreeMap<Vec<u8>, usize>,
    me: usize,
    parent: usize,
    blocks: &[(usize, usize)],
    nid_of: &[u64],
    nodes: &[Node],
) -> Vec<u8> {
    let mut names = dir_names(children, me, parent);
    let mut out = Vec::new();
    for (i, (count, _)) in blocks.iter().enumerate() {
        let entries: Vec<_> = names
            .by_ref()
            .take(*count)
            .map(|(name, id)| (name, nid_of[id], format::file_type(nodes[id].mode)))
            .collect();
        out.extend_from_slice(&format::dir_block(&entries));
        if i + 1 < blocks.len() {
            out.resize((i + 1) * BLOCK as usize, 0);
        }
    }
    out
}

/// Writes `buf` (whole blocks) at `at`, skipping runs of all-zero blocks.
fn write_nonzero(f: &File, buf: &[u8], at: u64) -> std::io::Result<()> {
    let bs = BLOCK as usize;
    let mut i = 0;
    while i < buf.len() {
        if is_zero(&buf[i..i + bs]) {
            i += bs;
            continue;
        }
        let mut j = i + bs;
        while j < buf.len() && !is_zero(&buf[j..j + bs]) {
            j += bs;
        }
        f.write_all_at(&buf[i..j], at + i as u64)?;
        i = j;
    }
    Ok(())
}

/// Padding after an inode's xattrs to the 8-byte alignment the map header
/// needs (inodes are 32 or 64 bytes at 32-byte slots; xattrs 12 + 4n).
fn zmeta_pad(xattr_len: usize) -> usize {
    (8 - xattr_len % 8) % 8
}

fn is_zero(b: &[u8]) -> bool {
    // A slice comparison is a memcmp, fast in every build profile.
    static ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];
    b == &ZEROS[..b.len()]
}

/// A path's components; "" and "." are the root. Leading "/" and "./",
/// empty and "." components are dropped; "..", NUL and names over 255
/// bytes are refused.
pub fn split_path(path: &[u8]) -> std::result::Result<Vec<&[u8]>, String> {
    if path.contains(&0) {
        return Err("the path holds a NUL byte".into());
    }
    let mut out = Vec::new();
    for c in path.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("the path holds a \"..\" component".into()),
            c if c.len() > NAME_MAX => {
                return Err(format!(
                    "a name of {} bytes (erofs holds {NAME_MAX})",
                    c.len()
                ));
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// The xattr body of an entry: names split into erofs' indexes, sorted.
fn encode_xattrs(x: &[(Vec<u8>, Vec<u8>)]) -> std::result::Result<Vec<u8>, String> {
    let mut split = Vec::with_capacity(x.len());
    for (name, value) in x {
        let shown = String::from_utf8_lossy(name);
        let (idx, suffix) = format::split_xattr_name(name)
            .ok_or_else(|| format!("xattr {shown:?}: a namespace erofs cannot hold"))?;
        if suffix.len() > NAME_MAX {
            return Err(format!(
                "xattr {shown:?}: name of {} bytes after its prefix (erofs holds 255)",
                suffix.len()
            ));
        }
        if value.len() > usize::from(u16::MAX) {
            return Err(format!(
                "xattr {shown:?}: value of {} bytes (erofs holds 65535)",
                value.len()
            ));
        }
        split.push((idx, suffix, &value[..]));
    }
    split.sort();
    if let Some(w) = split
        .windows(2)
        .find(|w| (w[0].0, w[0].1) == (w[1].0, w[1].1))
    {
        return Err(format!(
            "xattr {:?} given twice (index {})",
            String::from_utf8_lossy(w[0].1),
            w[0].0
        ));
    }
    let body = format::xattr_ibody(&split);
    if body.len() > format::XATTR_IBODY_HEADER + 4 * (usize::from(u16::MAX) - 1) {
        return Err(format!(
            "xattrs of {} bytes (erofs holds about 256 KiB)",
            body.len()
        ));
    }
    Ok(body)
}
