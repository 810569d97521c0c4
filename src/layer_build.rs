//! `sharedloop add`: turn a directory (an unpacked layer in overlayfs form)
//! into a read-only filesystem image in the store.
//!
//! Two things are computed from the directory: its OCI diff ID (sha256 of a
//! deterministic tar stream, with overlay whiteouts translated back into OCI
//! `.wh.` entries, so the ID is what the image's own diff would be), and the
//! image itself (ext4, xfs or erofs), sized from a walk of the tree.

use std::collections::{HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::fs::Metadata;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use rustix::io::Errno;
use sha2::{Digest as _, Sha256};
use tar::{Builder, EntryType, Header};

use crate::error::{Error, Result};
use crate::ids::{Digest, Name, chain_id};
use crate::store::{self, FsType, LayerMeta, Staging, Store};

const BLOCK: u64 = 4096;
const MIB: u64 = 1 << 20;
const OPAQUE_XATTR: &[u8] = b"trusted.overlay.opaque";
const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// tar's name and linkname fields; longer ones need a GNU long-name entry.
const TAR_NAME_MAX: usize = 100;
/// mkfs.xfs (xfsprogs 6.x) refuses smaller filesystems.
const XFS_MIN: u64 = 300 * MIB;
/// The log mkfs.xfs 6.x creates on a small filesystem.
const XFS_LOG: u64 = 64 * MIB;
const LABEL: &str = "sl-layer";

// ---------------------------------------------------------------- public API

/// sha256 of a deterministic tar stream of `dir` (the layer's OCI diff ID).
pub fn diff_id_of_dir(dir: &Path) -> Result<Digest> {
    let hw = write_tar(dir, HashWriter(Sha256::new()))?;
    Ok(Digest::from_bytes(hw.0.finalize().into()))
}

/// Build a read-only filesystem image of `dir` at `out` (a new file path that does not exist yet),
/// right-sized for the content. Returns the image size in bytes.
pub fn build_image(dir: &Path, fstype: FsType, out: &Path) -> Result<u64> {
    let plan = plan(dir)?;
    build_image_with(dir, fstype, out, &plan)
}

pub struct AddOptions<'a> {
    pub dir: &'a Path,
    pub parent: Option<Digest>,
    pub name: Option<&'a Name>,
    pub fstype: FsType,
    pub quiet: bool,
}

/// The whole of `sharedloop add`. Returns the chain ID.
pub fn add_layer(store: &Store, opts: &AddOptions) -> Result<Digest> {
    check_dir(opts.dir)?;
    if let Some(p) = &opts.parent {
        check_parent(store, p)?;
    }
    let diff_id = diff_id_of_dir(opts.dir)?;
    let chain = chain_id(opts.parent.as_ref(), &diff_id);
    if let Some(which) = store.has_layer(&chain)? {
        say(opts, format_args!("layer {chain} is already in the {which} store {}", store.dir(which).display()));
        // Asking for a name on an existing layer still means "name it".
        return name_layer(store.dir(which), opts, &chain);
    }
    let staging = Staging::create(store, &format!("layer-{}", chain.hex()))?;
    let store_dir = staging.store_dir.clone();
    let size = build_image(opts.dir, opts.fstype, &staging.path.join("layer.img"))
        .map_err(|e| e.context(&format!("layer {chain}")))?;
    let meta = LayerMeta {
        chain_id: chain,
        diff_id,
        parent: opts.parent,
        fstype: opts.fstype,
        size,
        created: store::now_secs(),
    };
    let dest = staging.publish_layer(&meta)?;
    say(opts, format_args!("added layer {chain} ({}, {size} bytes) at {}", opts.fstype, dest.display()));
    name_layer(&store_dir, opts, &chain)
}

// ---------------------------------------------------------------- add helpers

fn check_dir(dir: &Path) -> Result<()> {
    let meta = std::fs::metadata(dir).map_err(|e| Error::io("layer directory", dir, &e))?;
    if !meta.is_dir() {
        return Err(Error::sys("layer directory", dir, Errno::NOTDIR));
    }
    Ok(())
}

fn check_parent(store: &Store, parent: &Digest) -> Result<()> {
    match store.has_layer(parent)? {
        Some(_) => Ok(()),
        None => Err(Error::Store(format!(
            "parent {parent}: not found in {} nor {}",
            store.root.display(),
            store.fallback.display()
        ))),
    }
}

fn name_layer(store_dir: &Path, opts: &AddOptions, chain: &Digest) -> Result<Digest> {
    if let Some(name) = opts.name {
        store::write_name(store_dir, name, chain)?;
        say(opts, format_args!("named {chain} {name} in {}", store_dir.display()));
    }
    Ok(*chain)
}

fn say(opts: &AddOptions, msg: std::fmt::Arguments) {
    if !opts.quiet {
        eprintln!("sharedloop: {msg}");
    }
}

// ---------------------------------------------------------------- tree walk

/// One entry of a walk; `rel` is empty for the top directory itself.
struct Entry<'a> {
    rel: &'a Path,
    path: &'a Path,
    meta: &'a Metadata,
    /// Names in the directory, in walk order (empty for non-directories).
    children: &'a [OsString],
}

impl Entry<'_> {
    fn is_root(&self) -> bool {
        self.rel.as_os_str().is_empty()
    }
    fn is_whiteout(&self) -> bool {
        self.meta.file_type().is_char_device() && self.meta.rdev() == 0
    }
    /// Hard-link identity, for non-directories that have other links.
    fn link_key(&self) -> Option<(u64, u64)> {
        (!self.meta.is_dir() && self.meta.nlink() > 1).then(|| (self.meta.dev(), self.meta.ino()))
    }
    fn refuse_socket(&self) -> Result<()> {
        if self.meta.file_type().is_socket() {
            return Err(Error::sys("refusing socket (a layer cannot hold one)", self.path, Errno::OPNOTSUPP));
        }
        Ok(())
    }
}

/// Pre-order walk, children sorted by byte-wise name, symlinks not
/// followed (only `dir` itself may be one). Iterative, so a deep tree cannot
/// overflow the stack.
fn walk(dir: &Path, mut visit: impl FnMut(&Entry) -> Result<()>) -> Result<()> {
    check_dir(dir)?;
    let mut stack = vec![PathBuf::new()];
    while let Some(rel) = stack.pop() {
        let path = if rel.as_os_str().is_empty() { dir.to_path_buf() } else { dir.join(&rel) };
        let meta = if rel.as_os_str().is_empty() {
            std::fs::metadata(&path)
        } else {
            std::fs::symlink_metadata(&path)
        }
        .map_err(|e| Error::io("stat", &path, &e))?;
        let children = if meta.is_dir() { sorted_children(&path)? } else { Vec::new() };
        visit(&Entry { rel: &rel, path: &path, meta: &meta, children: &children })?;
        stack.extend(children.iter().rev().map(|c| rel.join(c)));
    }
    Ok(())
}

fn sorted_children(dir: &Path) -> Result<Vec<OsString>> {
    let err = |e: &io::Error| Error::io("read directory", dir, e);
    let mut names = Vec::new();
    for ent in std::fs::read_dir(dir).map_err(|e| err(&e))? {
        names.push(ent.map_err(|e| err(&e))?.file_name());
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

// ---------------------------------------------------------------- xattrs

type Xattrs = Vec<(Vec<u8>, Vec<u8>)>;

/// All extended attributes of `path` (not following symlinks), sorted by
/// name so their order never depends on the filesystem.
fn read_xattrs(path: &Path) -> Result<Xattrs> {
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

fn get_xattr(path: &Path, name: &[u8]) -> Result<Option<Vec<u8>>> {
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

fn is_opaque(xattrs: &Xattrs) -> bool {
    xattrs.iter().any(|(n, v)| n == OPAQUE_XATTR && v == b"y")
}

/// The xattrs an OCI layer tar carries; trusted.overlay.* was translated
/// into whiteout entries instead, and other namespaces are host-specific.
fn tar_xattrs(xattrs: &Xattrs) -> Vec<&(Vec<u8>, Vec<u8>)> {
    xattrs
        .iter()
        .filter(|(n, _)| n.starts_with(b"user.") || n == b"security.capability")
        .collect()
}

// ---------------------------------------------------------------- diff tar

struct HashWriter(Sha256);

impl Write for HashWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Write the deterministic tar of `dir` into `out` and give `out` back.
fn write_tar<W: Write>(dir: &Path, out: W) -> Result<W> {
    let mut tw = TarWriter { b: Builder::new(out), links: HashMap::new() };
    walk(dir, |e| tw.entry(e))?;
    tw.b.into_inner().map_err(|e| Error::io("finish layer tar", dir, &e))
}

struct TarWriter<W: Write> {
    b: Builder<W>,
    /// First path seen for each multiply-linked inode.
    links: HashMap<(u64, u64), PathBuf>,
}

impl<W: Write> TarWriter<W> {
    fn entry(&mut self, e: &Entry) -> Result<()> {
        e.refuse_socket()?;
        if e.is_root() {
            // The top directory has no entry of its own, but can be opaque.
            let x = read_xattrs(e.path)?;
            return if is_opaque(&x) { self.opaque_marker(e) } else { Ok(()) };
        }
        if e.is_whiteout() {
            return self.whiteout(e);
        }
        let xattrs = read_xattrs(e.path)?;
        self.pax_xattrs(e, &tar_xattrs(&xattrs))?;
        if let Some(first) = e.link_key().and_then(|k| self.first_link(k, e.rel)) {
            return self.hardlink(e, &first);
        }
        let ft = e.meta.file_type();
        if ft.is_dir() {
            self.dir(e)?;
            if is_opaque(&xattrs) {
                self.opaque_marker(e)?;
            }
            Ok(())
        } else if ft.is_file() {
            self.file(e)
        } else if ft.is_symlink() {
            self.symlink(e)
        } else {
            self.special(e)
        }
    }

    /// Some(first path) if this inode was already written.
    fn first_link(&mut self, key: (u64, u64), rel: &Path) -> Option<PathBuf> {
        match self.links.get(&key) {
            Some(p) => Some(p.clone()),
            None => {
                self.links.insert(key, rel.to_path_buf());
                None
            }
        }
    }

    fn dir(&mut self, e: &Entry) -> Result<()> {
        let mut h = header(e.meta, EntryType::Directory);
        // A trailing slash, as docker and GNU tar write directories.
        let mut name = e.rel.as_os_str().to_owned();
        name.push("/");
        self.append(e, &mut h, Path::new(&name), io::empty())
    }

    fn file(&mut self, e: &Entry) -> Result<()> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(e.path)
            .map_err(|err| Error::io("open", e.path, &err))?;
        let now = f.metadata().map_err(|err| Error::io("stat", e.path, &err))?;
        if now.ino() != e.meta.ino() || now.dev() != e.meta.dev() {
            return Err(Error::sys("file replaced while reading the layer", e.path, Errno::AGAIN));
        }
        let mut h = header(e.meta, EntryType::Regular);
        h.set_size(e.meta.len());
        self.append(e, &mut h, e.rel, Exact { inner: f, left: e.meta.len() })
    }

    fn symlink(&mut self, e: &Entry) -> Result<()> {
        let target = std::fs::read_link(e.path).map_err(|err| Error::io("read symlink", e.path, &err))?;
        let mut h = header(e.meta, EntryType::Symlink);
        self.link_name(e, &mut h, target.as_os_str().as_bytes())?;
        self.append(e, &mut h, e.rel, io::empty())
    }

    fn hardlink(&mut self, e: &Entry, first: &Path) -> Result<()> {
        let mut h = header(e.meta, EntryType::Link);
        self.link_name(e, &mut h, first.as_os_str().as_bytes())?;
        self.append(e, &mut h, e.rel, io::empty())
    }

    fn special(&mut self, e: &Entry) -> Result<()> {
        let ft = e.meta.file_type();
        let kind = if ft.is_char_device() {
            EntryType::Char
        } else if ft.is_block_device() {
            EntryType::Block
        } else {
            EntryType::Fifo
        };
        let mut h = header(e.meta, kind);
        if kind != EntryType::Fifo {
            let rdev = e.meta.rdev();
            let io_err = |err: io::Error| Error::io("add to layer tar", e.path, &err);
            h.set_device_major(rustix::fs::major(rdev)).map_err(io_err)?;
            h.set_device_minor(rustix::fs::minor(rdev)).map_err(io_err)?;
        }
        self.append(e, &mut h, e.rel, io::empty())
    }

    /// An overlay whiteout (char 0/0) is, in OCI terms, an empty regular
    /// file `.wh.NAME` (mode 0600, as docker's overlay differ writes it).
    fn whiteout(&mut self, e: &Entry) -> Result<()> {
        let mut h = header(e.meta, EntryType::Regular);
        h.set_mode(0o600);
        let mut name = OsString::from(WHITEOUT_PREFIX);
        name.push(e.rel.file_name().unwrap_or_default());
        let rel = e.rel.parent().unwrap_or(Path::new("")).join(name);
        self.append(e, &mut h, &rel, io::empty())
    }

    fn opaque_marker(&mut self, e: &Entry) -> Result<()> {
        let mut h = header(e.meta, EntryType::Regular);
        h.set_mode(e.meta.mode() & 0o777);
        self.append(e, &mut h, &e.rel.join(OPAQUE_MARKER), io::empty())
    }

    /// Set the link name byte for byte: the tar crate's set_link_name would
    /// normalise it ("a//b" -> "a/b"), and a symlink target is data.
    fn link_name(&mut self, e: &Entry, h: &mut Header, target: &[u8]) -> Result<()> {
        let io_err = |err: io::Error| Error::io("add to layer tar", e.path, &err);
        if target.len() > TAR_NAME_MAX {
            let mut data = target.to_vec();
            data.push(0);
            let k = gnu_long_header(b'K', data.len() as u64);
            self.b.append(&k, &data[..]).map_err(io_err)?;
        }
        h.set_link_name_literal(&target[..target.len().min(TAR_NAME_MAX)]).map_err(io_err)
    }

    /// PAX records `SCHILY.xattr.NAME`, as GNU tar and docker write them.
    fn pax_xattrs(&mut self, e: &Entry, xattrs: &[&(Vec<u8>, Vec<u8>)]) -> Result<()> {
        if xattrs.is_empty() {
            return Ok(());
        }
        let mut data = Vec::new();
        for (name, value) in xattrs {
            let mut key = b"SCHILY.xattr.".to_vec();
            key.extend_from_slice(name);
            pax_record(&mut data, &key, value);
        }
        let mut h = Header::new_ustar();
        h.as_old_mut().name[..14].copy_from_slice(b"././@PaxHeader");
        h.set_entry_type(EntryType::XHeader);
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.b.append(&h, &data[..]).map_err(|err| Error::io("add to layer tar", e.path, &err))
    }

    fn append(&mut self, e: &Entry, h: &mut Header, name: &Path, data: impl Read) -> Result<()> {
        self.b
            .append_data(h, name, data)
            .map_err(|err| Error::io("add to layer tar", e.path, &err))
    }
}

fn header(m: &Metadata, kind: EntryType) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(m.mode() & 0o7777);
    h.set_uid(u64::from(m.uid()));
    h.set_gid(u64::from(m.gid()));
    h.set_mtime(m.mtime().max(0) as u64);
    h.set_size(0);
    h
}

/// Header of a GNU long name ('L') or long link name ('K') entry, the same
/// fields GNU tar writes.
fn gnu_long_header(kind: u8, size: u64) -> Header {
    let mut h = Header::new_gnu();
    let name = b"././@LongLink";
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_size(size);
    h.set_entry_type(EntryType::new(kind));
    h.set_cksum();
    h
}

/// "LEN key=value\n", where LEN counts the whole record including itself.
fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key);
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

/// Exactly `left` bytes: a file that shrank after stat would otherwise give
/// a tar whose header disagrees with its data.
struct Exact<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "file shrank while reading"));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

// ---------------------------------------------------------------- sizing

/// What a walk of the tree says about the image to build.
#[derive(Clone, Debug)]
struct Plan {
    /// ext4 image size.
    bytes: u64,
    inodes: u64,
    /// Data and metadata blocks the content needs, before filesystem overhead.
    content: u64,
    /// Newest mtime in the tree: the image's own timestamps, so that the
    /// same tree gives the same image.
    newest: i64,
    /// Hash of names and metadata: the image UUID and hash seed.
    fingerprint: [u8; 32],
    root: RootAttrs,
    /// mke2fs creates lost+found; only keep it if the tree has one.
    has_lost_found: bool,
}

#[derive(Clone, Debug, Default)]
struct RootAttrs {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
}

impl Plan {
    fn doubled(&self) -> Plan {
        Plan { bytes: self.bytes * 2, inodes: self.inodes * 2, content: self.content * 2, ..self.clone() }
    }

    fn xfs_bytes(&self) -> u64 {
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

fn plan(dir: &Path) -> Result<Plan> {
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
            self.root = RootAttrs { mode: m.mode() & 0o7777, uid: m.uid(), gid: m.gid(), mtime: m.mtime() };
            self.has_lost_found = e.children.iter().any(|c| c == "lost+found");
        }
        let xattrs = read_xattrs(e.path)?;
        let target = if m.file_type().is_symlink() {
            std::fs::read_link(e.path).map_err(|err| Error::io("read symlink", e.path, &err))?.into_os_string()
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
        for n in [u64::from(m.mode()), u64::from(m.uid()), u64::from(m.gid()), m.len(), m.mtime() as u64, m.rdev()] {
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
        let names: u64 = e.children.iter().map(|c| 8 + round_up(c.len() as u64, 4)).sum();
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
    if need <= 92 { 0 } else { round_up(need + 32, BLOCK) }
}

// ---------------------------------------------------------------- building

fn build_image_with(dir: &Path, fstype: FsType, out: &Path, plan: &Plan) -> Result<u64> {
    let guard = OutFile::create(out)?;
    match fstype {
        FsType::Ext4 => retry_on_no_space(plan, |p| build_ext4(dir, out, p))?,
        FsType::Xfs => retry_on_no_space(plan, |p| build_xfs(dir, out, p))?,
        FsType::Erofs => build_erofs(dir, out, plan)?,
    }
    let size = std::fs::metadata(out).map_err(|e| Error::io("stat image", out, &e))?.len();
    guard.keep();
    Ok(size)
}

/// The estimate is an estimate: one retry at twice the size.
fn retry_on_no_space(plan: &Plan, mut build: impl FnMut(&Plan) -> Result<()>) -> Result<()> {
    match build(plan) {
        Err(e) if is_no_space(&e) => build(&plan.doubled()),
        other => other,
    }
}

fn is_no_space(e: &Error) -> bool {
    match e {
        Error::Command { stderr, .. } => {
            let s = stderr.to_ascii_lowercase();
            ["could not allocate", "no space left", "no free space"].iter().any(|p| s.contains(p))
        }
        _ => false,
    }
}

/// A fresh sparse file of `size` bytes (an earlier attempt's blocks gone).
fn set_size(out: &Path, size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new().write(true).open(out).map_err(|e| Error::io("open image", out, &e))?;
    f.set_len(0)
        .and_then(|_| f.set_len(size))
        .map_err(|e| Error::io("size image", out, &e))
}

fn build_ext4(dir: &Path, out: &Path, plan: &Plan) -> Result<()> {
    set_size(out, plan.bytes)?;
    let uuid = uuid_from(&plan.fingerprint[..16]);
    let seed = uuid_from(&plan.fingerprint[16..]);
    let mut cmd = Command::new("mkfs.ext4");
    cmd.args(["-q", "-F", "-L", LABEL, "-T", "default", "-m", "0", "-b", "4096", "-I", "256"])
        // Read-only images never grow and never replay a journal.
        .args(["-O", "^has_journal,^resize_inode", "-U", &uuid])
        .arg("-E")
        .arg(format!("root_owner=0:0,nodiscard,hash_seed={seed}"))
        .arg("-N")
        .arg(plan.inodes.to_string())
        .arg("-d")
        .arg(dir)
        .arg(out)
        .env("E2FSPROGS_FAKE_TIME", plan.newest.to_string());
    run("build ext4 image", &mut cmd, None)?;
    fix_ext4_root(out, plan)
}

/// mke2fs 1.47.0 -d neither copies the top directory's owner, mode and
/// mtime nor leaves out lost+found, which would show up in every container
/// using the layer; debugfs fixes both.
fn fix_ext4_root(out: &Path, plan: &Plan) -> Result<()> {
    let r = &plan.root;
    let mut script = String::new();
    if !plan.has_lost_found {
        script.push_str("rmdir lost+found\n");
    }
    script.push_str(&format!(
        "sif / mode 0{:o}\nsif / uid {}\nsif / gid {}\nsif / mtime @{}\n",
        0o40000 | r.mode,
        r.uid,
        r.gid,
        r.mtime.max(0)
    ));
    let mut cmd = Command::new("debugfs");
    cmd.args(["-w", "-f", "-"]).arg(out).env("E2FSPROGS_FAKE_TIME", plan.newest.to_string());
    let stderr = run("fix ext4 image root", &mut cmd, Some(script.as_bytes()))?;
    // debugfs exits 0 even when a command fails; its only normal stderr
    // line is the version banner.
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.is_empty() && !l.starts_with("debugfs ")).collect();
    if !errors.is_empty() {
        return Err(Error::Command {
            what: "fix ext4 image root".into(),
            cmd: render(&cmd),
            status: "errors".into(),
            stderr: errors.join("; "),
        });
    }
    Ok(())
}

/// RFC 9562 version 8 (custom) UUID from 16 bytes of a hash.
fn uuid_from(b: &[u8]) -> String {
    let mut u = [0u8; 16];
    u.copy_from_slice(&b[..16]);
    u[6] = (u[6] & 0x0f) | 0x80;
    u[8] = (u[8] & 0x3f) | 0x80;
    let h = hex::encode(u);
    format!("{}-{}-{}-{}-{}", &h[..8], &h[8..12], &h[12..16], &h[16..20], &h[20..])
}

/// mkfs.xfs cannot populate, so the tree is copied in through a mount. The
/// mount lives in a private mount namespace and its loop device has
/// AUTOCLEAR (mount -o loop sets it): whatever happens to us or to the
/// child, even SIGKILL, the kernel takes both down with the namespace. The
/// image gets mkfs.xfs's random UUID: two xfs filesystems with one UUID
/// cannot be mounted at the same time.
fn build_xfs(dir: &Path, out: &Path, plan: &Plan) -> Result<()> {
    set_size(out, plan.xfs_bytes())?;
    let mut mkfs = Command::new("mkfs.xfs");
    mkfs.args(["-q", "-f", "-m", "reflink=0", "-L", LABEL]).arg(out);
    run("build xfs image", &mut mkfs, None)?;
    let mnt = TempDir::create("sharedloop-build")?;
    let src = std::path::absolute(dir).map_err(|e| Error::io("layer directory", dir, &e))?;
    let img = std::path::absolute(out).map_err(|e| Error::io("image", out, &e))?;
    let mut cp = Command::new("unshare");
    cp.args(["-m", "--propagation", "private", "sh", "-c", XFS_COPY_SCRIPT, "sh"])
        .arg(&img)
        .arg(&mnt.0)
        .arg(&src);
    run("copy layer into xfs image", &mut cp, None)?;
    Ok(())
}

/// `--preserve=xattr` after -a makes a lost xattr an error rather than a
/// warning; -n keeps the private mount out of /run/mount/utab.
const XFS_COPY_SCRIPT: &str = r#"mount -n -t xfs -o loop -- "$1" "$2" || exit
rc=0
cp -a --preserve=xattr -- "$3/." "$2/" || rc=$?
umount -n -- "$2" || rc=$?
exit $rc"#;

fn build_erofs(dir: &Path, out: &Path, plan: &Plan) -> Result<()> {
    let uuid = uuid_from(&plan.fingerprint[..16]);
    let mut cmd = Command::new("mkfs.erofs");
    cmd.args(["--quiet", "-zlz4hc", "--preserve-mtime", "-U", &uuid])
        .arg(out)
        .arg(dir)
        // The build time; mtimes newer than it would be clamped, and none is.
        .env("SOURCE_DATE_EPOCH", plan.newest.to_string());
    run("build erofs image", &mut cmd, None)?;
    Ok(())
}

// ---------------------------------------------------------------- commands

/// Run a command to completion; its stderr on success, Error::Command with
/// the command line, status and last stderr lines on failure.
fn run(what: &str, cmd: &mut Command, input: Option<&[u8]>) -> Result<String> {
    cmd.env("LC_ALL", "C")
        .stdin(if input.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let program = PathBuf::from(cmd.get_program());
    let mut child = cmd.spawn().map_err(|e| Error::io(format!("{what}: run"), &program, &e))?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        stdin.write_all(data).map_err(|e| Error::io(format!("{what}: write to"), &program, &e))?;
    }
    let out = child.wait_with_output().map_err(|e| Error::io(format!("{what}: wait for"), &program, &e))?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if out.status.success() {
        return Ok(stderr);
    }
    let status = match out.status.code() {
        Some(c) => format!("status {c}"),
        None => format!("signal {}", std::os::unix::process::ExitStatusExt::signal(&out.status).unwrap_or(0)),
    };
    Err(Error::Command { what: what.into(), cmd: render(cmd), status, stderr: tail(&stderr, 3) })
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join("; ")
}

fn render(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| shell_quote(&a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(s: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_./:=,^@%+-".contains(c);
    if !s.is_empty() && s.chars().all(plain) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

// ---------------------------------------------------------------- guards

/// The output image, removed on drop unless the build finished.
struct OutFile<'a> {
    path: &'a Path,
    keep: bool,
}

impl<'a> OutFile<'a> {
    fn create(path: &'a Path) -> Result<Self> {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(|e| Error::io("create image", path, &e))?;
        Ok(OutFile { path, keep: false })
    }
    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for OutFile<'_> {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_file(self.path);
        }
    }
}

/// A private (0700) empty directory, removed on drop. Only ever a mount
/// point inside a private namespace, so plain rmdir is enough and can
/// never delete anything below a mount.
struct TempDir(PathBuf);

impl TempDir {
    fn create(tag: &str) -> Result<Self> {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!(
            "{tag}.{}.{}",
            std::process::id(),
            store::unique_suffix()
        ));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| Error::io("create temporary directory", &path, &e))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

