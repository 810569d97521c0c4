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

use rustix::io::Errno;
use sha2::{Digest as _, Sha256};
use tar::{Builder, EntryType, Header};

use crate::command::Cmd;
use crate::error::{Error, Result};
use crate::ids::{Digest, Name, chain_id};
use crate::interrupt::step;
use crate::staging::Workspace;
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

/// What `sharedloop add` was asked: DIR, its parent layer, an optional name.
pub struct AddOptions<'a> {
    pub dir: &'a Path,
    pub parent: Option<Digest>,
    pub name: Option<&'a Name>,
    pub fstype: FsType,
    pub quiet: bool,
    /// Node-local staging directory (`--staging-dir`, `staging_dir=`);
    /// `None`: `tmp/` of the fallback store.
    pub staging_dir: Option<&'a Path>,
}

/// The whole of `sharedloop add`: check DIR and the parent, compute the
/// diff ID and chain ID, build the image in node-local staging and publish
/// it unless either store has that chain ID already, and record `name`
/// (also for an existing layer) in the store directory the layer lives in.
/// Returns the chain ID.
pub fn add_layer(store: &Store, opts: &AddOptions) -> Result<Digest> {
    crate::interrupt::install();
    check_dir(opts.dir)?;
    if let Some(p) = &opts.parent {
        check_parent(store, p)?;
    }
    let diff_id = diff_id_of_dir(opts.dir)?;
    let chain = chain_id(opts.parent.as_ref(), &diff_id);
    if let Some(which) = store.has_layer(&chain)? {
        say(
            opts,
            format_args!(
                "layer {chain} is already in the {which} store {}",
                store.dir(which).display()
            ),
        );
        // The chain ID names the content, not its format: one layer per
        // ID, so the one stored stays. Say so when another was asked for.
        if let Ok(meta) = Store::read_meta_in(store.dir(which), &chain)
            && meta.fstype != opts.fstype
        {
            log::warn!(
                "layer {chain} is stored as {} in {}; not stored again as {} (`sharedloop rm` it first to change its format)",
                meta.fstype,
                store.dir(which).display(),
                opts.fstype
            );
        }
        // Asking for a name on an existing layer still means "name it".
        return name_layer(store.dir(which), opts, &chain);
    }
    // The destination first: a store that cannot take the layer fails
    // before the build. Only the finished image goes there.
    let staging = Staging::create(store, &format!("layer-{}", chain.hex()))?;
    let store_dir = staging.store_dir.clone();
    let work = Workspace::new(store, opts.staging_dir).create(&format!("add-{}", chain.hex()))?;
    let img = work.path.join("layer.img");
    let size = build_image(opts.dir, opts.fstype, &img).map_err(|e| e.context(&format!("layer {chain}")))?;
    step("add-publish", None)?;
    staging.put_image(&img)?;
    drop(work);
    let meta = LayerMeta {
        chain_id: chain,
        diff_id,
        parent: opts.parent,
        fstype: opts.fstype,
        size,
        created: store::now_secs(),
    };
    let dest = staging.publish_layer(&meta)?;
    say(
        opts,
        format_args!(
            "added layer {chain} ({}, {size} bytes) at {}",
            opts.fstype,
            dest.display()
        ),
    );
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
        say(
            opts,
            format_args!("named {chain} {name} in {}", store_dir.display()),
        );
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
fn walk(dir: &Path, mut visit: impl FnMut(&Entry) -> Result<()>) -> Result<()> {
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
    let mut tw = TarWriter {
        b: Builder::new(out),
        links: HashMap::new(),
    };
    walk(dir, |e| tw.entry(e))?;
    tw.b.into_inner()
        .map_err(|e| Error::io("finish layer tar", dir, &e))
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
            return if is_opaque(&x) {
                self.opaque_marker(e)
            } else {
                Ok(())
            };
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
        let now = f
            .metadata()
            .map_err(|err| Error::io("stat", e.path, &err))?;
        if now.ino() != e.meta.ino() || now.dev() != e.meta.dev() {
            return Err(Error::sys(
                "file replaced while reading the layer",
                e.path,
                Errno::AGAIN,
            ));
        }
        let mut h = header(e.meta, EntryType::Regular);
        h.set_size(e.meta.len());
        self.append(
            e,
            &mut h,
            e.rel,
            Exact {
                inner: f,
                left: e.meta.len(),
            },
        )
    }

    fn symlink(&mut self, e: &Entry) -> Result<()> {
        let target =
            std::fs::read_link(e.path).map_err(|err| Error::io("read symlink", e.path, &err))?;
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
            h.set_device_major(rustix::fs::major(rdev))
                .map_err(io_err)?;
            h.set_device_minor(rustix::fs::minor(rdev))
                .map_err(io_err)?;
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
        h.set_link_name_literal(&target[..target.len().min(TAR_NAME_MAX)])
            .map_err(io_err)
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
        self.b
            .append(&h, &data[..])
            .map_err(|err| Error::io("add to layer tar", e.path, &err))
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
/// (Public for the import tests, which write PAX headers of their own.)
pub fn pax_record(out: &mut Vec<u8>, key: &[u8], value: &[u8]) {
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
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "file shrank while reading",
            ));
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
        Plan {
            bytes: self.bytes * 2,
            inodes: self.inodes * 2,
            content: self.content * 2,
            ..self.clone()
        }
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

// ---------------------------------------------------------------- building

fn build_image_with(dir: &Path, fstype: FsType, out: &Path, plan: &Plan) -> Result<u64> {
    let guard = OutFile::create(out)?;
    match fstype {
        FsType::Ext4 => retry_on_no_space(plan, |p| build_ext4(dir, out, p))?,
        FsType::Xfs => retry_on_no_space(plan, |p| build_xfs(dir, out, p))?,
        FsType::Erofs => build_erofs(dir, out, plan)?,
    }
    let size = std::fs::metadata(out)
        .map_err(|e| Error::io("stat image", out, &e))?
        .len();
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
            ["could not allocate", "no space left", "no free space"]
                .iter()
                .any(|p| s.contains(p))
        }
        _ => false,
    }
}

/// A fresh sparse file of `size` bytes (an earlier attempt's blocks gone).
fn set_size(out: &Path, size: u64) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(out)
        .map_err(|e| Error::io("open image", out, &e))?;
    f.set_len(0)
        .and_then(|_| f.set_len(size))
        .map_err(|e| Error::io("size image", out, &e))
}

fn build_ext4(dir: &Path, out: &Path, plan: &Plan) -> Result<()> {
    set_size(out, plan.bytes)?;
    let uuid = uuid_from(&plan.fingerprint[..16]);
    let seed = uuid_from(&plan.fingerprint[16..]);
    let mut cmd = Cmd::new("mkfs.ext4");
    cmd.args([
        "-q", "-F", "-L", LABEL, "-T", "default", "-m", "0", "-b", "4096", "-I", "256",
    ])
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
    cmd.run("build ext4 image")?;
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
    let mut cmd = Cmd::new("debugfs");
    cmd.args(["-w", "-f", "-"])
        .arg(out)
        .env("E2FSPROGS_FAKE_TIME", plan.newest.to_string());
    let stderr = cmd.run_with_input("fix ext4 image root", script.as_bytes())?;
    // debugfs exits 0 even when a command fails; its only normal stderr
    // line is the version banner.
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.is_empty() && !l.starts_with("debugfs "))
        .collect();
    if !errors.is_empty() {
        return Err(Error::Command {
            what: "fix ext4 image root".into(),
            cmd: cmd.render(),
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
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

/// mkfs.xfs cannot populate, so the tree is copied in through a mount. The
/// mount lives in a private mount namespace and its loop device has
/// AUTOCLEAR (mount -o loop sets it). The copy runs as init of a new PID
/// namespace: unshare dies with us (as every command we run does), its
/// forked child with it (--kill-child), and with a namespace's init the
/// kernel kills everything in it (mount, cp). So whatever happens to us,
/// even SIGKILL, nothing goes on writing, and the kernel takes the mount
/// and the loop device down with the namespaces. The image gets
/// mkfs.xfs's random UUID: two xfs filesystems with one UUID cannot be
/// mounted at the same time.
fn build_xfs(dir: &Path, out: &Path, plan: &Plan) -> Result<()> {
    set_size(out, plan.xfs_bytes())?;
    let mut mkfs = Cmd::new("mkfs.xfs");
    mkfs.args(["-q", "-f", "-m", "reflink=0", "-L", LABEL])
        .arg(out);
    mkfs.run("build xfs image")?;
    let mnt = TempDir::create("sharedloop-build")?;
    let src = std::path::absolute(dir).map_err(|e| Error::io("layer directory", dir, &e))?;
    let img = std::path::absolute(out).map_err(|e| Error::io("image", out, &e))?;
    let mut cp = Cmd::new("unshare");
    cp.args([
        "-m",
        "-p",
        "--fork",
        "--kill-child",
        "--propagation",
        "private",
        "sh",
        "-c",
        XFS_COPY_SCRIPT,
        "sh",
    ])
    .arg(&img)
    .arg(&mnt.0)
    .arg(&src);
    cp.run("copy layer into xfs image")?;
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
    let mut cmd = Cmd::new("mkfs.erofs");
    cmd.args(["--quiet", "-zlz4hc", "--preserve-mtime", "-U", &uuid])
        .arg(out)
        .arg(dir)
        // The build time; mtimes newer than it would be clamped, and none is.
        .env("SOURCE_DATE_EPOCH", plan.newest.to_string());
    cmd.run("build erofs image")?;
    Ok(())
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
        use std::sync::atomic::{AtomicU64, Ordering};
        // Two builds in one process can start within the clock's resolution.
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "{tag}.{}.{}.{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed),
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

#[cfg(test)]
mod tests {

    #[test]
    fn pax_records_count_their_own_length() {
        // The length field includes its own digits: 8, 9, then 11 (10 would
        // be wrong once the field itself grows to two digits).
        let cases: &[(&str, &str, &str)] = &[
            ("a", "bcd", "8 a=bcd\n"),
            ("a", "bcde", "9 a=bcde\n"),
            ("a", "bcdef", "11 a=bcdef\n"),
            ("path", &"x".repeat(92), ""),
        ];
        for (k, v, want) in cases {
            let mut out = Vec::new();
            pax_record(&mut out, k.as_bytes(), v.as_bytes());
            let text = String::from_utf8(out.clone()).unwrap();
            let stated: usize = text.split(' ').next().unwrap().parse().unwrap();
            assert_eq!(stated, out.len(), "{text:?}");
            if !want.is_empty() {
                assert_eq!(text, *want);
            }
        }
    }

    use super::*;
    use std::io::BufRead;
    use std::process::{Command, Stdio};
    use std::os::unix::fs::{PermissionsExt, lchown, symlink};
    use std::process::Child;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    use rustix::fs::{AtFlags, CWD, FileType, Mode, Timespec, Timestamps, XattrFlags};

    use crate::store::Which;

    const T: i64 = 1_600_000_000;

    static COUNTER: AtomicU64 = AtomicU64::new(0);

    /// A scratch directory, removed with everything in it on drop. Images
    /// are only ever mounted in private namespaces, so nothing below it is a
    /// mount point in ours.
    struct TestDir(PathBuf);

    impl TestDir {
        fn new(tag: &str) -> Self {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let p = std::env::temp_dir().join(format!(
                "sharedloop-lb-{tag}.{}.{n}.{}",
                std::process::id(),
                store::unique_suffix()
            ));
            std::fs::create_dir(&p).unwrap();
            TestDir(p)
        }
        fn join(&self, p: impl AsRef<Path>) -> PathBuf {
            self.0.join(p)
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn write(p: &Path, data: &[u8]) {
        std::fs::write(p, data).unwrap();
    }

    fn mknod(p: &Path, ft: FileType, dev: (u32, u32)) {
        let mode = Mode::from_raw_mode(0o644);
        rustix::fs::mknodat(CWD, p, ft, mode, rustix::fs::makedev(dev.0, dev.1)).unwrap();
    }

    fn set_xattr(p: &Path, name: &str, value: &[u8]) {
        rustix::fs::lsetxattr(p, name, value, XattrFlags::empty()).unwrap();
    }

    fn xattr(p: &Path, name: &str) -> Option<Vec<u8>> {
        get_xattr(p, name.as_bytes()).unwrap()
    }

    fn set_mtimes(p: &Path, t: i64) {
        let ts = Timespec {
            tv_sec: t,
            tv_nsec: 0,
        };
        let times = Timestamps {
            last_access: ts,
            last_modification: ts,
        };
        rustix::fs::utimensat(CWD, p, &times, AtFlags::SYMLINK_NOFOLLOW).unwrap();
        if std::fs::symlink_metadata(p).unwrap().is_dir() {
            for c in std::fs::read_dir(p).unwrap() {
                set_mtimes(&c.unwrap().path(), t);
            }
        }
    }

    fn non_utf8() -> &'static OsStr {
        OsStr::from_bytes(b"caf\xe9")
    }

    /// Every kind of entry a layer can hold, all mtimes T.
    fn sample_tree(root: &Path) {
        let a = root.join("a");
        std::fs::create_dir_all(a.join("opq/sub")).unwrap();
        write(&a.join("file.txt"), b"hello");
        lchown(a.join("file.txt"), Some(1234), Some(5678)).unwrap();
        // After chown, which clears set-user-ID.
        std::fs::set_permissions(a.join("file.txt"), std::fs::Permissions::from_mode(0o4755))
            .unwrap();
        set_xattr(&a.join("file.txt"), "user.foo", b"bar");
        std::fs::hard_link(a.join("file.txt"), a.join("hard")).unwrap();
        mknod(&a.join("gone"), FileType::CharacterDevice, (0, 0));
        set_xattr(&a.join("opq"), "trusted.overlay.opaque", b"y");
        write(&a.join("opq/sub/inner"), b"inner");
        symlink("../x//y", a.join("sym")).unwrap();
        symlink("t".repeat(200), a.join("longsym")).unwrap();
        mknod(&a.join("fifo"), FileType::Fifo, (0, 0));
        mknod(&a.join("blk"), FileType::BlockDevice, (7, 200));
        write(&root.join("l".repeat(150)), b"long");
        write(&root.join(non_utf8()), b"x");
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o750)).unwrap();
        set_mtimes(root, T);
    }

    struct TarEnt {
        path: Vec<u8>,
        kind: EntryType,
        mode: u32,
        uid: u64,
        link: Option<Vec<u8>>,
        data: Vec<u8>,
        dev: (Option<u32>, Option<u32>),
        xattrs: Vec<(String, Vec<u8>)>,
        uname: Vec<u8>,
    }

    fn tar_of(dir: &Path) -> Vec<TarEnt> {
        let bytes = write_tar(dir, Vec::new()).unwrap();
        let mut ar = tar::Archive::new(&bytes[..]);
        let mut out = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let xattrs = match e.pax_extensions().unwrap() {
                Some(px) => px
                    .map(|x| x.unwrap())
                    .map(|x| (x.key().unwrap().to_string(), x.value_bytes().to_vec()))
                    .collect(),
                None => Vec::new(),
            };
            let h = e.header().clone();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.push(TarEnt {
                path: e.path_bytes().to_vec(),
                kind: h.entry_type(),
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                link: e.link_name_bytes().map(|l| l.to_vec()),
                data,
                dev: match h.entry_type() {
                    EntryType::Block | EntryType::Char => {
                        (h.device_major().unwrap(), h.device_minor().unwrap())
                    }
                    _ => (None, None),
                },
                xattrs,
                uname: h.username_bytes().unwrap_or_default().to_vec(),
            });
        }
        out
    }

    fn find<'a>(ents: &'a [TarEnt], path: &[u8]) -> &'a TarEnt {
        ents.iter()
            .find(|e| e.path == path)
            .unwrap_or_else(|| panic!("no entry {}", String::from_utf8_lossy(path)))
    }

    #[test]
    fn diff_id_is_deterministic_and_content_sensitive() {
        let (a, b) = (TestDir::new("det-a"), TestDir::new("det-b"));
        sample_tree(&a.0);
        sample_tree(&b.0);
        let id = diff_id_of_dir(&a.0).unwrap();
        assert_eq!(id, diff_id_of_dir(&b.0).unwrap());
        // The hashing writer sees exactly the tar stream.
        assert_eq!(id, Digest::of_bytes(&write_tar(&a.0, Vec::new()).unwrap()));

        write(&b.join("a/opq/sub/inner"), b"innes");
        set_mtimes(&b.join("a/opq/sub/inner"), T);
        let changed = diff_id_of_dir(&b.0).unwrap();
        assert_ne!(id, changed);
        set_mtimes(&b.join("a/opq/sub/inner"), T + 1);
        assert_ne!(changed, diff_id_of_dir(&b.0).unwrap());
    }

    #[test]
    fn tar_entries_order_names_and_types() {
        let d = TestDir::new("tar");
        sample_tree(&d.0);
        let ents = tar_of(&d.0);
        let long_name = "l".repeat(150);
        let want: Vec<&[u8]> = vec![
            b"a/",
            b"a/blk",
            b"a/fifo",
            b"a/file.txt",
            b"a/.wh.gone",
            b"a/hard",
            b"a/longsym",
            b"a/opq/",
            b"a/opq/.wh..wh..opq",
            b"a/opq/sub/",
            b"a/opq/sub/inner",
            b"a/sym",
            b"caf\xe9",
            long_name.as_bytes(),
        ];
        assert_eq!(
            ents.iter().map(|e| e.path.as_slice()).collect::<Vec<_>>(),
            want
        );
        assert!(ents.iter().all(|e| e.uname.is_empty()));

        let f = find(&ents, b"a/file.txt");
        assert_eq!(
            (f.kind, f.mode, f.uid, f.data.as_slice()),
            (EntryType::Regular, 0o4755, 1234, &b"hello"[..])
        );
        assert_eq!(
            f.xattrs,
            vec![("SCHILY.xattr.user.foo".to_string(), b"bar".to_vec())]
        );
        let h = find(&ents, b"a/hard");
        assert_eq!(
            (h.kind, h.link.as_deref()),
            (EntryType::Link, Some(&b"a/file.txt"[..]))
        );
        let s = find(&ents, b"a/sym");
        assert_eq!(
            (s.kind, s.link.as_deref()),
            (EntryType::Symlink, Some(&b"../x//y"[..]))
        );
        let ls = find(&ents, b"a/longsym");
        assert_eq!(ls.link.as_deref(), Some("t".repeat(200).as_bytes()));
        let blk = find(&ents, b"a/blk");
        assert_eq!(
            (blk.kind, blk.dev),
            (EntryType::Block, (Some(7), Some(200)))
        );
        assert_eq!(find(&ents, b"a/fifo").kind, EntryType::Fifo);
        assert_eq!(find(&ents, b"caf\xe9").data, b"x");
        assert_eq!(find(&ents, long_name.as_bytes()).data, b"long");
        assert_eq!(find(&ents, b"a/").kind, EntryType::Directory);
    }

    #[test]
    fn tar_translates_whiteouts_and_opaque_dirs() {
        let d = TestDir::new("wh");
        sample_tree(&d.0);
        set_xattr(&d.0, "trusted.overlay.opaque", b"y");
        set_mtimes(&d.0, T);
        let ents = tar_of(&d.0);
        // An opaque top directory has no entry, only its marker, first.
        assert_eq!(ents[0].path, b".wh..wh..opq");
        let wh = find(&ents, b"a/.wh.gone");
        assert_eq!(
            (wh.kind, wh.mode, wh.data.len()),
            (EntryType::Regular, 0o600, 0)
        );
        let opq = find(&ents, b"a/opq/.wh..wh..opq");
        assert_eq!(
            (opq.kind, opq.mode, opq.data.len()),
            (EntryType::Regular, 0o755, 0)
        );
        assert!(
            ents.iter().all(|e| e.kind != EntryType::Char),
            "no char 0/0 left"
        );
        assert!(
            ents.iter()
                .all(|e| e.xattrs.iter().all(|(k, _)| !k.contains("trusted.")))
        );
    }

    #[test]
    fn sockets_and_non_directories_are_refused() {
        let d = TestDir::new("sock");
        let sock = d.join("s");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let e = diff_id_of_dir(&d.0).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::OPNOTSUPP));
        assert!(e.to_string().contains(&sock.display().to_string()), "{e}");
        let e = build_image(&d.0, FsType::Ext4, &d.join("out.img")).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::OPNOTSUPP));
        assert!(!d.join("out.img").exists());

        let e = diff_id_of_dir(&sock).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOTDIR));
        let e = diff_id_of_dir(&d.join("missing")).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOENT));
    }

    // ------------------------------------------------------------ mounts

    /// An image mounted read-only in a private mount namespace, seen from
    /// here through /proc/PID/root. Closing the shell's stdin unmounts; the
    /// loop device has AUTOCLEAR.
    struct Mounted {
        child: Child,
        view: PathBuf,
        img: PathBuf,
    }

    const PROBE: &str = r#"mount -n -t "$3" -o ro,loop -- "$1" "$2" || exit 1
echo ready
read x
umount -n -- "$2""#;

    fn mount_ro(img: &Path, fstype: FsType, mnt: &Path) -> Mounted {
        std::fs::create_dir(mnt).unwrap();
        let mut child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", PROBE, "sh"])
            .arg(img)
            .arg(mnt)
            .arg(fstype.as_str())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        let view = PathBuf::from(format!("/proc/{}/root{}", child.id(), mnt.display()));
        let m = Mounted {
            child,
            view,
            img: img.to_path_buf(),
        };
        assert_eq!(line.trim(), "ready", "mount of {} failed", img.display());
        m
    }

    impl Mounted {
        fn unmount(mut self) {
            drop(self.child.stdin.take());
            assert!(self.child.wait().unwrap().success(), "umount failed");
            assert_no_loop(&self.img);
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            drop(self.child.stdin.take());
            let _ = self.child.wait();
        }
    }

    /// AUTOCLEAR detaches after the last close, not always at once.
    fn assert_no_loop(img: &Path) {
        let start = Instant::now();
        loop {
            let out = Command::new("losetup").arg("-j").arg(img).output().unwrap();
            if out.stdout.is_empty() {
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "loop device left: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn check_image_tree(view: &Path, src: &Path) {
        let lstat = |p: &str| std::fs::symlink_metadata(view.join(p)).unwrap();
        assert_eq!(std::fs::read(view.join("a/file.txt")).unwrap(), b"hello");
        let f = lstat("a/file.txt");
        assert_eq!(
            (f.mode() & 0o7777, f.uid(), f.gid(), f.mtime(), f.nlink()),
            (0o4755, 1234, 5678, T, 2)
        );
        assert_eq!(lstat("a/hard").ino(), f.ino());
        let wh = lstat("a/gone");
        assert!(
            wh.file_type().is_char_device() && wh.rdev() == 0,
            "whiteout kept as char 0/0"
        );
        assert_eq!(
            xattr(&view.join("a/opq"), "trusted.overlay.opaque").as_deref(),
            Some(&b"y"[..])
        );
        assert_eq!(
            xattr(&view.join("a/file.txt"), "user.foo").as_deref(),
            Some(&b"bar"[..])
        );
        assert_eq!(
            std::fs::read_link(view.join("a/sym")).unwrap(),
            Path::new("../x//y")
        );
        assert_eq!(
            std::fs::read_link(view.join("a/longsym"))
                .unwrap()
                .as_os_str()
                .len(),
            200
        );
        let blk = lstat("a/blk");
        assert!(blk.file_type().is_block_device());
        assert_eq!(
            (rustix::fs::major(blk.rdev()), rustix::fs::minor(blk.rdev())),
            (7, 200)
        );
        assert!(lstat("a/fifo").file_type().is_fifo());
        assert_eq!(std::fs::read(view.join(non_utf8())).unwrap(), b"x");
        assert_eq!(std::fs::read(view.join("l".repeat(150))).unwrap(), b"long");
        assert_eq!(
            std::fs::read(view.join("a/opq/sub/inner")).unwrap(),
            b"inner"
        );
        let root = std::fs::metadata(view).unwrap();
        assert_eq!((root.mode() & 0o7777, root.uid()), (0o750, 0));
        // Nothing added at the top, lost+found included.
        assert_eq!(
            sorted_children(view).unwrap(),
            sorted_children(src).unwrap()
        );
    }

    fn build_and_check(fstype: FsType) -> u64 {
        let d = TestDir::new(fstype.as_str());
        let src = d.join("src");
        std::fs::create_dir(&src).unwrap();
        sample_tree(&src);
        let img = d.join("layer.img");
        let size = build_image(&src, fstype, &img).unwrap();
        assert_eq!(size, std::fs::metadata(&img).unwrap().len());
        assert_no_loop(&img);
        let m = mount_ro(&img, fstype, &d.join("mnt"));
        check_image_tree(&m.view, &src);
        m.unmount();
        size
    }

    #[test]
    fn ext4_image_keeps_files_whiteouts_and_opaque_dirs() {
        let size = build_and_check(FsType::Ext4);
        // Tiny tree: the 16 MiB floor plus the inode table, rounded to MiB.
        assert_eq!(size, 17 * MIB);
    }

    #[test]
    fn xfs_image_keeps_files_whiteouts_and_opaque_dirs() {
        assert_eq!(build_and_check(FsType::Xfs), XFS_MIN);
    }

    #[test]
    fn erofs_image_keeps_files_whiteouts_and_opaque_dirs() {
        build_and_check(FsType::Erofs);
    }

    #[test]
    fn ext4_and_erofs_images_are_reproducible() {
        let d = TestDir::new("repro");
        let src = d.join("src");
        std::fs::create_dir(&src).unwrap();
        sample_tree(&src);
        // mke2fs copies atimes, and the first read of a file (relatime)
        // moves its atime; add_layer reads everything for the diff ID first.
        diff_id_of_dir(&src).unwrap();
        for fs in [FsType::Ext4, FsType::Erofs] {
            let one = d.join(format!("one.{fs}"));
            let two = d.join(format!("two.{fs}"));
            build_image(&src, fs, &one).unwrap();
            std::thread::sleep(Duration::from_millis(1100));
            build_image(&src, fs, &two).unwrap();
            assert!(
                std::fs::read(&one).unwrap() == std::fs::read(&two).unwrap(),
                "{fs} images differ"
            );
        }
    }

    #[test]
    fn ext4_retries_once_at_double_size_then_fails_cleanly() {
        let d = TestDir::new("nospace");
        let src = d.join("src");
        std::fs::create_dir(&src).unwrap();
        // Non-zero data: mke2fs skips all-zero blocks.
        write(&src.join("big"), &vec![0xa5; 20 * MIB as usize]);
        let mut p = plan(&src).unwrap();
        assert!(p.bytes >= 20 * MIB + 16 * MIB, "plan {p:?}");

        p.bytes = 16 * MIB;
        let img = d.join("retry.img");
        assert_eq!(
            build_image_with(&src, FsType::Ext4, &img, &p).unwrap(),
            32 * MIB
        );

        p.bytes = 8 * MIB;
        let img = d.join("fail.img");
        let e = build_image_with(&src, FsType::Ext4, &img, &p).unwrap_err();
        match &e {
            Error::Command {
                cmd,
                stderr,
                status,
                ..
            } => {
                assert!(cmd.starts_with("mkfs.ext4 -q -F"), "{cmd}");
                assert!(stderr.contains("Could not allocate block"), "{stderr}");
                assert_eq!(status, "status 1");
            }
            other => panic!("want Error::Command, got {other:?}"),
        }
        assert!(!img.exists(), "failed image removed");
    }

    #[test]
    fn build_image_never_overwrites() {
        let d = TestDir::new("exists");
        let src = d.join("src");
        std::fs::create_dir(&src).unwrap();
        let out = d.join("layer.img");
        write(&out, b"precious");
        let e = build_image(&src, FsType::Ext4, &out).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::EXIST));
        assert_eq!(std::fs::read(&out).unwrap(), b"precious");
    }

    // ------------------------------------------------------------ add_layer

    fn opts<'a>(
        dir: &'a Path,
        parent: Option<Digest>,
        name: Option<&'a Name>,
        fstype: FsType,
    ) -> AddOptions<'a> {
        AddOptions {
            dir,
            parent,
            name,
            fstype,
            quiet: true,
            staging_dir: None,
        }
    }

    #[test]
    fn add_layer_end_to_end() {
        let t = TestDir::new("add");
        let store = Store::new(t.join("root"), t.join("fallback"));
        let base = t.join("base");
        std::fs::create_dir(&base).unwrap();
        sample_tree(&base);
        let name = Name::parse("test/base:1").unwrap();

        let id1 = add_layer(&store, &opts(&base, None, Some(&name), FsType::Ext4)).unwrap();
        let diff1 = diff_id_of_dir(&base).unwrap();
        assert_eq!(id1, chain_id(None, &diff1));
        let layer_dir = t.join("root/layers").join(id1.hex());
        let img_len = std::fs::metadata(layer_dir.join("layer.img"))
            .unwrap()
            .len();
        let meta = Store::read_meta_in(&store.root, &id1).unwrap();
        assert_eq!(
            (meta.diff_id, meta.parent, meta.fstype, meta.size),
            (diff1, None, FsType::Ext4, img_len)
        );
        assert!(meta.created > 0);
        assert_eq!(store.read_name(&name).unwrap(), id1);
        let name2 = Name::parse("test/base:latest").unwrap();
        let again = add_layer(&store, &opts(&base, None, Some(&name2), FsType::Ext4)).unwrap();
        assert_eq!(again, id1);
        assert_eq!(store.read_name(&name2).unwrap(), id1);

        let top = t.join("top");
        std::fs::create_dir(&top).unwrap();
        write(&top.join("new"), b"new");
        mknod(&top.join("a"), FileType::CharacterDevice, (0, 0));
        let o = opts(&top, Some(id1), None, FsType::Erofs);
        let id2 = add_layer(&store, &o).unwrap();
        assert_eq!(id2, chain_id(Some(&id1), &diff_id_of_dir(&top).unwrap()));
        assert_eq!(
            Store::read_meta_in(&store.root, &id2).unwrap().parent,
            Some(id1)
        );
        assert!(
            t.join("root/layers")
                .join(id2.hex())
                .join("layer.img")
                .is_file()
        );

        // Again: same ID, nothing rebuilt, nothing left in tmp.
        let before = std::fs::metadata(t.join("root/layers").join(id2.hex()).join("meta.json"))
            .unwrap()
            .ino();
        assert_eq!(add_layer(&store, &o).unwrap(), id2);
        let after = std::fs::metadata(t.join("root/layers").join(id2.hex()).join("meta.json"))
            .unwrap()
            .ino();
        assert_eq!(before, after);
        assert_eq!(std::fs::read_dir(t.join("root/tmp")).unwrap().count(), 0);
        // The fallback holds the (node-local) staging, emptied, and no
        // layer or name while the root works.
        assert_eq!(std::fs::read_dir(t.join("fallback/tmp")).unwrap().count(), 0);
        assert_eq!(
            std::fs::read_dir(t.join("fallback")).unwrap().count(),
            1,
            "fallback has only tmp/"
        );
        assert_eq!(store.has_layer(&id2).unwrap(), Some(Which::Root));
    }

    #[test]
    fn add_layer_validates_dir_and_parent() {
        let t = TestDir::new("addval");
        let store = Store::new(t.join("root"), t.join("fallback"));
        let dir = t.join("dir");
        std::fs::create_dir(&dir).unwrap();
        let missing = Digest::of_bytes(b"no such layer");
        let e = add_layer(&store, &opts(&dir, Some(missing), None, FsType::Ext4)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "parent {missing}: not found in {} nor {}",
                store.root.display(),
                store.fallback.display()
            )
        );
        let e = add_layer(&store, &opts(&t.join("nope"), None, None, FsType::Ext4)).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOENT));
        write(&t.join("file"), b"");
        let e = add_layer(&store, &opts(&t.join("file"), None, None, FsType::Ext4)).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOTDIR));
        assert!(
            e.to_string()
                .contains(&t.join("file").display().to_string())
        );
        assert!(!t.join("root").exists() && !t.join("fallback").exists());
    }

    #[test]
    fn add_layer_reports_enotdir_root_without_falling_back() {
        let t = TestDir::new("enotdir");
        write(&t.join("plain"), b"");
        let store = Store::new(t.join("plain/root"), t.join("fallback"));
        let dir = t.join("dir");
        std::fs::create_dir(&dir).unwrap();
        let e = add_layer(&store, &opts(&dir, None, None, FsType::Ext4)).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOTDIR), "{e}");
        assert!(
            e.to_string().contains(&store.root.display().to_string()),
            "{e}"
        );
        assert!(!t.join("fallback").exists());
    }

    #[test]
    fn add_layer_creates_a_missing_root() {
        let t = TestDir::new("newroot");
        let store = Store::new(t.join("new/deeper/root"), t.join("fallback"));
        let dir = t.join("dir");
        std::fs::create_dir(&dir).unwrap();
        write(&dir.join("f"), b"f");
        let id = add_layer(&store, &opts(&dir, None, None, FsType::Erofs)).unwrap();
        assert!(
            store
                .root
                .join("layers")
                .join(id.hex())
                .join("layer.img")
                .is_file()
        );
        assert!(!t.join("fallback/layers").exists());
    }
}
