//! The layer store: a root directory (often shared storage) and a fallback
//! directory, with the original driver's rule between them.
//!
//! Layout of each store directory:
//!
//! ```text
//! layers/<64 hex chain id>/meta.json   parent link, diff id, fstype, size
//! layers/<64 hex chain id>/layer.img   the read-only filesystem image
//! names/<encoded name>                 "sha256:<chain id>\n"
//! configs/sha256-<hex>.json            image configs, verbatim (`configs`)
//! confignames/<encoded name>           "sha256:<config digest>\n"
//! uppers/<encoded name>.img            writable upper images
//! tmp/                                 staging; renamed into place whole
//! ```
//!
//! Every path below a store directory is opened from the store directory's
//! fd, refusing symlinks and `..` (`beneath`: openat2 RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS, or a walk one component at a time where openat2 is
//! missing), so a symlink planted in a (shared, maybe writable by others)
//! store cannot redirect us.

pub mod configs;
pub mod ids;
pub mod sharedfs;
pub mod staging;

use std::collections::BTreeSet;
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Missing, Result, StoreError};
use crate::store::ids::{Digest, LayerRef, Name, chain_id};

pub const DEFAULT_ROOT: &str = "/var/lib/sharedloop/root";
pub const DEFAULT_FALLBACK: &str = "/var/lib/sharedloop/private";

/// overlayfs takes at most 500 lower layers.
pub const MAX_LAYERS: usize = 500;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsType {
    Ext4,
    Xfs,
    Erofs,
}

/// The format `add` and `import` write when not told: erofs where the
/// kernel has it (exact, compact, one cheap superblock per layer), ext4
/// elsewhere. `configured` is `layer_fstype=` of the configuration file
/// (None: auto). Returns the format and why, for `status` and `-v`.
///
/// The importing node's kernel decides; a cluster whose other nodes lack
/// erofs pins `layer_fstype=ext4` in the configuration file.
pub fn default_layer_fstype(configured: Option<FsType>) -> (FsType, String) {
    match configured {
        Some(t) => (t, "layer_fstype in the configuration file".into()),
        None if crate::kernel::has_erofs().have => (FsType::Erofs, "this kernel has erofs".into()),
        None => (FsType::Ext4, format!("this kernel has no erofs ({})", crate::kernel::has_erofs().seen)),
    }
}

/// `--fstype` or `layer_fstype=`: a format, or `auto` (None).
pub fn parse_layer_fstype(s: &str) -> Result<Option<FsType>> {
    match s {
        "auto" => Ok(None),
        s => FsType::parse(s).map(Some),
    }
}

/// `--compress` or `layer_compression=`: whether erofs layers are written
/// LZ4-compressed (`lz4`) or not (`none`).
pub fn parse_layer_compression(s: &str) -> Result<bool> {
    match s {
        "none" => Ok(false),
        "lz4" => Ok(true),
        _ => Err(Error::Usage(format!(
            "{s:?}: unsupported layer compression (none or lz4)"
        ))),
    }
}

impl FsType {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ext4" => Ok(FsType::Ext4),
            "xfs" => Ok(FsType::Xfs),
            "erofs" => Ok(FsType::Erofs),
            _ => Err(Error::Usage(format!(
                "{s:?}: unsupported filesystem type (ext4, xfs or erofs)"
            ))),
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            FsType::Ext4 => "ext4",
            FsType::Xfs => "xfs",
            FsType::Erofs => "erofs",
        }
    }
}

impl fmt::Display for FsType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What is stored beside each layer image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerMeta {
    pub chain_id: Digest,
    pub diff_id: Digest,
    pub parent: Option<Digest>,
    pub fstype: FsType,
    /// Size of layer.img in bytes.
    pub size: u64,
    /// Seconds since the epoch.
    pub created: u64,
}

impl LayerMeta {
    /// The metadata must agree with itself (ChainID rule) and with where it
    /// was found; this also makes a parent cycle impossible short of a sha256
    /// collision.
    pub fn validate(&self, expect: &Digest, path: &Path) -> Result<()> {
        if &self.chain_id != expect {
            return Err(Error::damaged(path, format!("metadata names {} but is stored as {expect}", self.chain_id)));
        }
        let computed = chain_id(self.parent.as_ref(), &self.diff_id);
        if computed != self.chain_id {
            return Err(Error::damaged(
                path,
                format!(
                    "metadata of {expect} is inconsistent: parent {} and diff id {} give chain id {computed}",
                    self.parent.map(|p| p.to_string()).unwrap_or_else(|| "none".into()),
                    self.diff_id
                ),
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Which {
    Root,
    Fallback,
}

impl fmt::Display for Which {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Which::Root => "root",
            Which::Fallback => "fallback",
        })
    }
}

/// A layer found in the store, its image already open: the fd we checked is
/// the fd the loop device gets.
#[derive(Debug)]
pub struct Layer {
    pub meta: LayerMeta,
    pub which: Which,
    pub image_path: PathBuf,
    pub image: OwnedFd,
}

#[derive(Clone, Debug)]
pub struct Store {
    pub root: PathBuf,
    pub fallback: PathBuf,
    /// Store directories opened once per process (a 500-layer chain would
    /// otherwise open each twice per layer). Only successes are kept: a
    /// directory missing now may be created later by this same process.
    handles: Arc<[Mutex<Option<Arc<DirHandle>>>; 2]>,
}

/// An open store directory and its canonical path: the path the kernel
/// prints for files below it (as in a loop device's backing_file).
#[derive(Debug)]
pub struct DirHandle {
    pub path: PathBuf,
    pub fd: OwnedFd,
}

/// The errors for which the original driver tries the fallback directory.
pub fn falls_back(e: Errno) -> bool {
    e == Errno::NOENT || e == Errno::ACCESS || e == Errno::ROFS
}

/// Open `rel` below the directory `dir`, refusing any symlink or escape.
pub fn open_beneath(dir: &Path, rel: &str, flags: OFlags, mode: Mode) -> Result<OwnedFd> {
    let dfd = open_dir(dir)?;
    openat_beneath(&dfd, dir, rel, flags, mode)
}

pub fn open_dir(dir: &Path) -> Result<OwnedFd> {
    rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| Error::sys("open store directory", dir, e))
}

/// Open `rel` below the open directory `dfd` (whose path is `dir`),
/// refusing any symlink or escape. A file opened for reading or writing
/// must be a regular file: whoever can write to a shared store could
/// otherwise plant a FIFO, whose open blocks until a writer comes (every
/// node's boot, for ever), or a device, whose open has side effects. So
/// the file is looked up with O_PATH first (which never blocks and opens
/// nothing), its type checked, and only then opened for real, with
/// O_NONBLOCK in case it was swapped for a FIFO in between, and checked
/// again. O_PATH and directory opens are passed through.
pub fn openat_beneath(
    dfd: &OwnedFd,
    dir: &Path,
    rel: &str,
    flags: OFlags,
    mode: Mode,
) -> Result<OwnedFd> {
    openat_beneath_stat(dfd, dir, rel, flags, mode).map(|(fd, _)| fd)
}

/// [`openat_beneath`], also giving the opened file's stat (O_PATH and
/// directory opens: a stat of their own) so that callers checking a size
/// need not ask again: a mount resolves a chain of hundreds of layers this
/// way, and every syscall per layer counts there.
pub fn openat_beneath_stat(
    dfd: &OwnedFd,
    dir: &Path,
    rel: &str,
    flags: OFlags,
    mode: Mode,
) -> Result<(OwnedFd, rustix::fs::Stat)> {
    let path = dir.join(rel);
    let open = |flags: OFlags| {
        crate::kernel::beneath::open(dfd, rel, flags, mode, crate::kernel::beneath::Mounts::Cross).map_err(|e| {
            let what = if e == Errno::LOOP || e == Errno::XDEV {
                "refusing symlink or path outside the store"
            } else {
                "open"
            };
            Error::sys(what, &path, e)
        })
    };
    let stat = |fd: &OwnedFd| rustix::fs::fstat(fd).map_err(|e| Error::sys("stat", &path, e));
    if flags.intersects(OFlags::PATH | OFlags::DIRECTORY) {
        let fd = open(flags)?;
        let st = stat(&fd)?;
        return Ok((fd, st));
    }
    if !flags.contains(OFlags::CREATE) {
        // The type before any open, by one stat of the name. It may follow
        // a symlink on the way (statat has no RESOLVE_BENEATH), which only
        // reads attributes; the open below refuses such a path anyway.
        // Anything but a regular file goes the slower way, an O_PATH open,
        // whose errors say exactly what is wrong.
        let regular = rustix::fs::statat(dfd, rel, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile);
        if !regular {
            let probe = open(OFlags::PATH)?;
            regular_or_refuse(&path, stat(&probe)?.st_mode)?;
        }
    }
    let fd = open(flags | OFlags::NONBLOCK | OFlags::NOCTTY)?;
    let st = stat(&fd)?;
    regular_or_refuse(&path, st.st_mode)?;
    if !flags.contains(OFlags::NONBLOCK) {
        // F_SETFL changes only these of the open flags: what was asked of
        // them, without O_NONBLOCK (no F_GETFL needed).
        let settable = OFlags::APPEND | OFlags::DIRECT | OFlags::NOATIME;
        rustix::fs::fcntl_setfl(&fd, flags & settable).map_err(|e| Error::sys("fcntl F_SETFL", &path, e))?;
    }
    Ok((fd, st))
}

/// What a file of mode `mode` is, in words, for a refusal.
pub fn file_type_name(mode: u32) -> &'static str {
    use rustix::fs::FileType as T;
    match T::from_raw_mode(mode) {
        T::RegularFile => "a regular file",
        T::Directory => "a directory",
        T::Symlink => "a symlink",
        T::Fifo => "a FIFO",
        T::Socket => "a socket",
        T::CharacterDevice => "a character device",
        T::BlockDevice => "a block device",
        T::Unknown => "a file of unknown type",
    }
}

/// Err naming what `path` is unless `mode` is a regular file's.
fn regular_or_refuse(path: &Path, mode: u32) -> Result<()> {
    if rustix::fs::FileType::from_raw_mode(mode) == rustix::fs::FileType::RegularFile {
        return Ok(());
    }
    Err(Error::damaged(
        path,
        format!("{}, not a regular file: refusing to open it (damaged or tampered store?)", file_type_name(mode)),
    ))
}

/// A small file in as few reads as possible (one, for metadata).
pub(crate) fn read_small(fd: OwnedFd, path: &Path, limit: u64) -> Result<String> {
    let size = rustix::fs::fstat(&fd).map(|st| st.st_size.max(0) as u64).unwrap_or(0);
    read_small_sized(fd, path, limit, size)
}

/// [`read_small`] of a file whose size the caller has just stat'ed.
pub(crate) fn read_small_sized(fd: OwnedFd, path: &Path, limit: u64, size: u64) -> Result<String> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    // Stop at the size the file has (metadata and name records never
    // change in place) instead of reading on to EOF: on a network
    // filesystem that last empty read is one more round trip per layer.
    // The attributes come from the lookup just made; size 0 (a FIFO, a
    // file of /proc) reads to EOF as before.
    loop {
        let n = rustix::io::read(&fd, &mut buf[len..]).map_err(|e| Error::sys("read", path, e))?;
        len += n;
        if n == 0 || len as u64 >= limit || (size > 0 && len as u64 >= size) {
            break;
        }
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
    }
    buf.truncate(len.min(limit as usize));
    String::from_utf8(buf).map_err(|_| Error::damaged(path, "not UTF-8 text"))
}

/// The inode number `names/<file>` has in a read of the directory, or
/// None if the directory does not list it. A client of shared storage
/// answers a lookup from its cache for a while (GlusterFS FUSE: 1 s,
/// NFS: up to acregmax) and so can open the record another node has just
/// replaced; a directory read goes to the server (and with readdirplus
/// refreshes those cached entries).
fn listed_ino(dir: &Path, sub: &str, file: &str) -> Result<Option<u64>> {
    let d = open_beneath(dir, sub, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty())?;
    let path = dir.join(sub);
    for ent in rustix::fs::Dir::read_from(&d).map_err(|e| Error::sys("read directory", &path, e))? {
        let ent = ent.map_err(|e| Error::sys("read directory", &path, e))?;
        if ent.file_name().to_bytes() == file.as_bytes() {
            return Ok(Some(ent.ino()));
        }
    }
    Ok(None)
}

/// What `names/<name>` in the store directory `dir` points to, as the
/// server has it now.
pub fn read_name_in(dir: &Path, name: &Name) -> Result<Digest> {
    read_pointer_in(dir, "names", name)
}

/// What `<sub>/<name>` (a `names/` or `confignames/` record) in the store
/// directory `dir` points to, as the server has it now.
pub fn read_pointer_in(dir: &Path, sub: &str, name: &Name) -> Result<Digest> {
    let rel = format!("{sub}/{}", name.file_name());
    // Names are replaced in place, so a client may hold the old file for
    // as long as its entry cache lasts (GlusterFS: 1 s): try for longer
    // than that (10 ms doubling, 1.3 s in all).
    retry_with(NAME_TRIES, STALE_PAUSE, |e| e.errno() == Some(Errno::STALE), std::thread::sleep, || {
        let path = dir.join(&rel);
        let Some(ino) = listed_ino(dir, sub, &name.file_name())? else {
            return Err(Error::sys("open", &path, Errno::NOENT));
        };
        // O_NONBLOCK: a FIFO planted in the store must not hang us.
        let fd = open_beneath(dir, &rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())?;
        // Opened through a cached entry older than the directory: the
        // record was replaced since. ESTALE, so we look again.
        let st = rustix::fs::fstat(&fd).map_err(|e| Error::sys("stat", &path, e))?;
        if st.st_ino as u64 != ino {
            log::debug!("{}: cached entry (inode {}) older than the directory's ({ino}), looking again", path.display(), st.st_ino);
            return Err(Error::sys("open", &path, Errno::STALE));
        }
        // A read that fails ENOENT after the open worked means the file
        // went while we opened it (GlusterFS's open-behind opens lazily):
        // stale, look again; never "not in this store", which would send
        // us to the fallback.
        let text = read_small(fd, &path, 200).map_err(|e| match e.errno() {
            Some(Errno::NOENT) => Error::sys("read", &path, Errno::STALE),
            _ => e,
        })?;
        Digest::parse(text.trim())
            .map_err(|_| {
                Error::damaged(&path, format!("corrupt {} record", if sub == "names" { "name" } else { "config" }))
                    .context(&format!("name {name}"))
            })
    })
}

/// Reads of names and metadata are tried this often while they give
/// ESTALE, `STALE_PAUSE` apart at first, then twice as long each time.
const STALE_TRIES: u32 = 5;
const STALE_PAUSE: Duration = Duration::from_millis(10);
const NAME_TRIES: u32 = 8;
/// Publishing renames (layers, names): tries and first pause.
const PUBLISH_TRIES: u32 = 5;
const PUBLISH_PAUSE: Duration = Duration::from_millis(25);

/// `op` again while it fails with ESTALE, a few times. On shared storage
/// (NFS, GlusterFS FUSE) a name or a layer another node just replaced
/// leaves this node a cached dentry whose file handle is gone; opening the
/// path again looks it up afresh. `op` must open what it reads itself.
pub fn retry_stale<T>(op: impl FnMut() -> Result<T>) -> Result<T> {
    retry_with(STALE_TRIES, STALE_PAUSE, |e| e.errno() == Some(Errno::STALE), std::thread::sleep, op)
}

/// Errors of a rename on shared storage that a moment later may not be
/// there: a stale handle, a server or brick that did not answer, a busy
/// entry.
pub fn transient(e: Errno) -> bool {
    matches!(e, Errno::STALE | Errno::IO | Errno::AGAIN | Errno::BUSY | Errno::TIMEDOUT | Errno::INTR)
}

/// Run `op` up to `tries` times while its error is `retryable`, sleeping
/// `first`, then twice as long each time, in between; a signal ends the
/// retries (the last error is returned, the next step sees the signal).
pub fn retry_with<T>(
    tries: u32,
    first: Duration,
    retryable: impl Fn(&Error) -> bool,
    mut sleep: impl FnMut(Duration),
    mut op: impl FnMut() -> Result<T>,
) -> Result<T> {
    let mut pause = first;
    let mut n = 1;
    loop {
        match op() {
            Err(e) if n < tries && retryable(&e) && !crate::interrupt::interrupted() => {
                log::debug!("{e}: trying again ({n}/{tries})");
                sleep(pause);
                pause *= 2;
                n += 1;
            }
            r => return r,
        }
    }
}

impl Store {
    pub fn new(root: impl Into<PathBuf>, fallback: impl Into<PathBuf>) -> Self {
        Store {
            root: root.into(),
            fallback: fallback.into(),
            handles: Arc::new([Mutex::new(None), Mutex::new(None)]),
        }
    }

    /// The open store directory `w` (an error such as ENOENT if it is not
    /// there, which the fallback rule then judges).
    pub fn handle(&self, w: Which) -> Result<Arc<DirHandle>> {
        let slot = &self.handles[w as usize];
        let mut g = slot.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = g.as_ref() {
            return Ok(Arc::clone(h));
        }
        let dir = self.dir(w);
        let fd = open_dir(dir)?;
        let path = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let h = Arc::new(DirHandle { path, fd });
        *g = Some(Arc::clone(&h));
        Ok(h)
    }

    /// Err unless at least one of the two store directories can be
    /// opened. Checked before a lookup so that a shared store that is not
    /// mounted, or a mistyped `loopback_root`, is reported as such with
    /// its errno, instead of as "no such image".
    pub fn require(&self) -> Result<()> {
        let errno = |w| match self.handle(w) {
            Ok(_) => Ok(()),
            Err(e) => match e.errno() {
                Some(n) if falls_back(n) || n == Errno::NOTDIR => Err(n),
                _ => Ok(()), // another failure: the lookup itself reports it
            },
        };
        match (errno(Which::Root), errno(Which::Fallback)) {
            (Err(r), Err(f)) => Err(Error::NoStore {
                root: self.root.clone(),
                root_errno: r.into(),
                fallback: self.fallback.clone(),
                fallback_errno: f.into(),
            }),
            _ => Ok(()),
        }
    }

    /// The store directories that cannot be opened, with why: for the
    /// messages of lookups that found nothing.
    pub fn missing(&self) -> Vec<(Which, &Path, crate::error::Errno)> {
        [Which::Root, Which::Fallback]
            .into_iter()
            .filter_map(|w| match self.handle(w) {
                Err(e) => e.errno().map(|n| (w, self.dir(w), n.into())),
                Ok(_) => None,
            })
            .collect()
    }

    /// "ROOT nor FALLBACK", saying which of them is not there at all.
    pub fn searched(&self) -> String {
        let gone: Vec<String> =
            self.missing().into_iter().map(|(_, p, e)| format!("{}: {e}", p.display())).collect();
        let note = if gone.is_empty() { String::new() } else { format!(" (store directory {})", gone.join(", ")) };
        format!("{} nor {}{note}", self.root.display(), self.fallback.display())
    }

    pub fn dir(&self, w: Which) -> &Path {
        match w {
            Which::Root => &self.root,
            Which::Fallback => &self.fallback,
        }
    }

    /// Run `f` on the root store, then on the fallback if the root's error
    /// is one the rule allows. Both errors are reported when both fail.
    pub fn with_fallback<T>(&self, mut f: impl FnMut(&Path, Which) -> Result<T>) -> Result<T> {
        match f(&self.root, Which::Root) {
            Ok(v) => Ok(v),
            Err(e) if e.errno().is_some_and(falls_back) => match f(&self.fallback, Which::Fallback) {
                Ok(v) => Ok(v),
                Err(e2) if e2.errno() == Some(Errno::NOENT) && e.errno() == Some(Errno::NOENT) => {
                    Err(e2)
                }
                Err(e2) => Err(Error::Store(StoreError::BothFailed { root: Box::new(e), fallback: Box::new(e2) })),
            },
            Err(e) => Err(e),
        }
    }

    fn meta_rel(id: &Digest) -> String {
        format!("layers/{}/meta.json", id.hex())
    }

    /// Read and validate one layer's metadata from one store directory.
    pub fn read_meta_in(dir: &Path, id: &Digest) -> Result<LayerMeta> {
        retry_stale(|| {
            let h = DirHandle { path: dir.to_path_buf(), fd: open_dir(dir)? };
            Self::read_meta_once(&h, id)
        })
    }

    /// A whole layer in the store directory `dir`: metadata that reads and
    /// validates, beside an image that is a regular file of the size the
    /// metadata says. What a lost publishing race must find in the way.
    pub fn whole_layer_in(dir: &Path, id: &Digest) -> Result<LayerMeta> {
        retry_stale(|| {
            let h = DirHandle { path: dir.to_path_buf(), fd: open_dir(dir)? };
            let meta = Self::read_meta_once(&h, id)?;
            let rel = format!("layers/{}/layer.img", id.hex());
            let fd = openat_beneath(&h.fd, dir, &rel, OFlags::PATH, Mode::empty())?;
            let st = rustix::fs::fstat(&fd).map_err(|e| Error::sys("stat", dir.join(&rel), e))?;
            let regular = rustix::fs::FileType::from_raw_mode(st.st_mode) == rustix::fs::FileType::RegularFile;
            if !regular || st.st_size as u64 != meta.size {
                return Err(Error::damaged(
                    dir.join(&rel),
                    format!(
                        "{}, its metadata says a file of {} bytes",
                        if regular { format!("{} bytes", st.st_size) } else { "not a regular file".into() },
                        meta.size
                    ),
                ));
            }
            Ok(meta)
        })
    }

    /// Run `f` on the open store directory `w`, again on ESTALE with the
    /// directory opened afresh (see [`retry_stale`]).
    fn at_dir<T>(&self, w: Which, mut f: impl FnMut(&DirHandle) -> Result<T>) -> Result<T> {
        retry_stale(|| {
            let h = self.handle(w)?;
            let r = f(&h);
            if r.as_ref().is_err_and(|e| e.errno() == Some(Errno::STALE)) {
                *self.handles[w as usize].lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            r
        })
    }

    fn read_meta_once(h: &DirHandle, id: &Digest) -> Result<LayerMeta> {
        let rel = Self::meta_rel(id);
        let (fd, st) = openat_beneath_stat(&h.fd, &h.path, &rel, OFlags::RDONLY, Mode::empty())?;
        let path = h.path.join(&rel);
        let text = read_small_sized(fd, &path, 1 << 16, st.st_size.max(0) as u64)?;
        let meta: LayerMeta = serde_json::from_str(&text).map_err(|e| {
            Error::damaged(&path, format!("corrupt metadata: {e}"))
        })?;
        meta.validate(id, &path)?;
        Ok(meta)
    }

    /// Find a layer by full chain ID, root first, and open its image.
    pub fn open_layer(&self, id: &Digest) -> Result<Layer> {
        self.with_fallback(|_, which| self.at_dir(which, |h| {
            let dir = &h.path;
            let meta = Self::read_meta_once(h, id)?;
            let rel = format!("layers/{}/layer.img", id.hex());
            let (image, st) = openat_beneath_stat(&h.fd, dir, &rel, OFlags::RDONLY, Mode::empty()).map_err(|e| match e.errno() {
                // Publishing is atomic, so metadata without its image is damage,
                // not "not here": say so instead of looking in the fallback.
                Some(Errno::NOENT) => Error::damaged(dir.join(&rel), "image missing beside its metadata (damaged store?)"),
                _ => e,
            })?;
            // A truncated or replaced image must not be mounted: the
            // filesystem in it would fail later, on some read, on every node.
            if st.st_size as u64 != meta.size {
                return Err(Error::damaged(
                    dir.join(&rel),
                    format!(
                        "{} bytes, its metadata says {} (truncated or replaced image; `sharedloop verify` checks the store)",
                        st.st_size, meta.size
                    ),
                ));
            }
            Ok(Layer {
                meta,
                which,
                image_path: dir.join(rel),
                image,
            })
        }))
        .map_err(|e| match e.errno() {
            Some(Errno::NOENT) => Error::not_found(Missing::Layer, id, self.searched()),
            // Nothing below names the layer (paths only): named once, here.
            _ => e.context(&format!("layer {id}")),
        })
    }

    /// All chain IDs in both stores starting with `prefix`. Unreadable or
    /// missing store directories count as empty, as with the fallback rule.
    pub fn ids_with_prefix(&self, prefix: &str) -> Result<BTreeSet<Digest>> {
        let mut out = BTreeSet::new();
        for dir in [&self.root, &self.fallback] {
            let layers = dir.join("layers");
            let rd = match std::fs::read_dir(&layers) {
                Ok(rd) => rd,
                Err(e) if falls_back(Errno::from_io_error(&e).unwrap_or(Errno::IO)) => continue,
                Err(e) => return Err(Error::io("read directory", &layers, &e)),
            };
            for ent in rd {
                let ent = ent.map_err(|e| Error::io("read directory", &layers, &e))?;
                if let Some(name) = ent.file_name().to_str()
                    && name.starts_with(prefix)
                        && let Some(d) = Digest::from_hex(name) {
                            out.insert(d);
                        }
            }
        }
        Ok(out)
    }

    /// What a name points to.
    pub fn read_name(&self, name: &Name) -> Result<Digest> {
        self.with_fallback(|dir, _| read_name_in(dir, name))
        .map_err(|e| match e.errno() {
            Some(Errno::NOENT) => Error::not_found(Missing::Image, name, self.searched()),
            _ => e,
        })
    }

    /// Resolve a user's reference to one full chain ID.
    pub fn resolve(&self, r: &LayerRef) -> Result<Digest> {
        match r {
            LayerRef::Id(d) => Ok(*d),
            LayerRef::Name(n) => self.read_name(n),
            LayerRef::Prefix(p) => {
                let found = self.ids_with_prefix(p)?;
                match found.len() {
                    0 => Err(Error::not_found(
                        Missing::IdPrefix,
                        p,
                        format!("{} nor {}", self.root.display(), self.fallback.display()),
                    )),
                    1 => Ok(*found.iter().next().expect("one")),
                    _ => Err(Error::Store(StoreError::Ambiguous {
                        prefix: p.to_string(),
                        matches: found.iter().map(|d| d.to_string()).collect(),
                    })),
                }
            }
        }
    }

    /// The chain of `top`, top first, following parent links. Refuses
    /// cycles, missing parents and chains longer than overlayfs takes.
    pub fn chain(&self, top: &Digest) -> Result<Vec<Layer>> {
        let mut out: Vec<Layer> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut next = Some(*top);
        while let Some(id) = next {
            if !seen.insert(id) {
                return Err(Error::Store(StoreError::Cycle { top: top.to_string(), at: id.to_string() }));
            }
            if out.len() == MAX_LAYERS {
                return Err(Error::Store(StoreError::TooLong { top: top.to_string(), max: MAX_LAYERS }));
            }
            let layer = self.open_layer(&id).map_err(|e| {
                if out.is_empty() {
                    e
                } else {
                    Error::Store(StoreError::Broken { top: top.to_string(), source: Box::new(e) })
                }
            })?;
            next = layer.meta.parent;
            out.push(layer);
        }
        Ok(out)
    }

    /// An explicit chain (`layers=`), top first, used as given.
    pub fn explicit_chain(&self, refs: &[LayerRef]) -> Result<Vec<Layer>> {
        let mut seen = BTreeSet::new();
        let mut out = Vec::with_capacity(refs.len());
        for r in refs {
            let id = self.resolve(r)?;
            if !seen.insert(id) {
                return Err(Error::Usage(format!("layers=: layer {id} is named twice")));
            }
            out.push(self.open_layer(&id)?);
        }
        Ok(out)
    }

    /// Is this layer in either store already?
    pub fn has_layer(&self, id: &Digest) -> Result<Option<Which>> {
        match self.with_fallback(|_, which| self.at_dir(which, |h| Self::read_meta_once(h, id)).map(|_| which)) {
            Ok(w) => Ok(Some(w)),
            Err(e) if e.errno().is_some_and(falls_back) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// A directory right below a store directory (`tmp`, `layers`, `names`),
/// created if missing and opened without following symlinks: a symlink
/// planted there (say `names -> /etc`) is refused, never written through.
pub fn store_subdir(dir: &Path, sub: &str, mode: u32) -> Result<OwnedFd> {
    mkdir_p(dir)?;
    // Another node may be creating it too: ENOENT, ESTALE or EIO right
    // after our EEXIST is that race, not an answer (see `mkdir_p`).
    retry_with(
        PUBLISH_TRIES,
        PUBLISH_PAUSE,
        |e| e.errno().is_some_and(|e| transient(e) || e == Errno::NOENT),
        std::thread::sleep,
        || {
            let dfd = open_dir(dir)?;
            match rustix::fs::mkdirat(&dfd, sub, Mode::from_raw_mode(mode)) {
                Ok(()) | Err(Errno::EXIST) => {}
                Err(e) => return Err(Error::sys("create directory", dir.join(sub), e)),
            }
            openat_beneath(&dfd, dir, sub, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
        },
    )
}

/// A staging directory under `<store>/tmp`, removed on drop unless
/// published. Its name carries host and pid so `gc` can tell whose it is.
/// Mode 0700: an image's setuid files and world-writable directories are
/// live in there while it is built, and no other user may reach them.
pub struct Staging {
    pub path: PathBuf,
    pub store_dir: PathBuf,
    pub which: Which,
    tmp: OwnedFd,
    name: String,
    done: bool,
}

impl Staging {
    /// Create a staging directory in the root store, or in the fallback
    /// under the rule.
    pub fn create(store: &Store, label: &str) -> Result<Staging> {
        store.with_fallback(|dir, which| {
            let tmp = store_subdir(dir, "tmp", 0o700)?;
            let name = temp_name(label);
            let path = dir.join("tmp").join(&name);
            rustix::fs::mkdirat(&tmp, name.as_str(), Mode::from_raw_mode(0o700))
                .map_err(|e| Error::sys("create staging directory", &path, e))?;
            Ok(Staging {
                path,
                store_dir: dir.to_path_buf(),
                which,
                tmp,
                name,
                done: false,
            })
        })
    }

    /// Put the finished image `img` (built in a node-local work
    /// directory) into this staging directory as `layer.img`: renamed when
    /// both are on one filesystem, else copied (sparse, synced). Returns
    /// whether it was copied.
    pub fn put_image(&self, img: &Path) -> Result<bool> {
        let dest = self.path.join("layer.img");
        let here = rustix::fs::statat(&self.tmp, self.name.as_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| Error::sys("stat", &self.path, e))?;
        let there = rustix::fs::stat(img.parent().unwrap_or(Path::new("."))).map_err(|e| Error::sys("stat", img, e))?;
        if here.st_dev == there.st_dev {
            match std::fs::rename(img, &dest) {
                Ok(()) => return Ok(false),
                // One device number, two mounts (a bind mount): copy.
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {}
                Err(e) => return Err(Error::io(format!("move {} to", img.display()), &dest, &e)),
            }
        }
        let t = std::time::Instant::now();
        let st = crate::store::staging::copy_sparse(img, &dest)?;
        log::info!(
            "{}: copied into {} ({} MiB of data, {}, {:.1} s)",
            img.display(),
            self.path.display(),
            st.data >> 20,
            if st.copy_file_range { "copy_file_range" } else { "read/write" },
            t.elapsed().as_secs_f64()
        );
        Ok(true)
    }

    /// Move a finished layer (layer.img and meta.json in the staging
    /// directory) into place with one rename. If another process or node
    /// published the same layer first, ours is dropped and theirs kept.
    ///
    /// Any rename error may be a lost race (a plain rename onto a directory
    /// another GlusterFS client just created gives ESTALE, not EEXIST), so
    /// after every one we look at what is at `layers/<hex>`: a whole layer
    /// is theirs (or ours, when the rename went through but its reply was
    /// lost) and is kept; a transient error (ESTALE, EIO, ...) is retried
    /// a few times; anything else is reported with the path.
    pub fn publish_layer(mut self, meta: &LayerMeta) -> Result<PathBuf> {
        let meta_path = self.path.join("meta.json");
        write_synced(&meta_path, serde_json::to_string_pretty(meta).expect("serialize").as_bytes())?;
        sync_path(&self.path.join("layer.img"))?;
        sync_path(&self.path)?;
        let layers = store_subdir(&self.store_dir, "layers", 0o755)?;
        let hex = meta.chain_id.hex();
        let dest = self.store_dir.join("layers").join(&hex);
        // The layer directory is readable by all, as mounts need nothing more.
        let _ = rustix::fs::chmodat(&self.tmp, self.name.as_str(), Mode::from_raw_mode(0o755), rustix::fs::AtFlags::empty());
        let renamed = retry_with(
            PUBLISH_TRIES,
            PUBLISH_PAUSE,
            |e| e.errno().is_some_and(transient),
            std::thread::sleep,
            || {
                let e = match rustix::fs::renameat(&self.tmp, self.name.as_str(), &layers, hex.as_str()) {
                    Ok(()) => return Ok(true),
                    Err(e) => e,
                };
                match Store::whole_layer_in(&self.store_dir, &meta.chain_id) {
                    Ok(_) => {
                        log::info!("{}: already published, ours dropped (rename: {})", dest.display(), crate::error::Errno(e));
                        Ok(false)
                    }
                    Err(_) if transient(e) => Err(Error::sys("publish layer", &dest, e)),
                    Err(c) if c.errno().is_some_and(transient) => Err(c.context("publish layer: look at what is in the way")),
                    // A directory there without a whole layer is damage, not a race.
                    Err(c) if e == Errno::EXIST || e == Errno::NOTEMPTY => Err(Error::damaged(&dest, format!("in the way of publishing and not a whole layer: {c}"))),
                    Err(_) => Err(Error::sys("publish layer", &dest, e)),
                }
            },
        )?;
        if renamed {
            self.done = true;
            let _ = sync_path(&self.store_dir.join("layers"));
        }
        Ok(dest)
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// What a running import (or add) is about to use or create: a file
/// `tmp/claim.<host>.<pid>.<uniq>` listing chain IDs, one a line, removed
/// when dropped. `gc` and `rm` keep the layers live claims name, so a layer
/// an import found already stored is not taken away before the import
/// names its image. A claim whose process died is stale and `gc` removes it.
pub struct Claim {
    tmp: OwnedFd,
    name: String,
    /// Holds an OFD write lock on the claim for as long as we live: `gc`
    /// on another node sharing the store tells a live import from a dead
    /// one by it (where the filesystem passes locks between nodes).
    _fd: OwnedFd,
}

pub const CLAIM_LABEL: &str = "claim";

impl Claim {
    pub fn create(store: &Store, ids: &[Digest]) -> Result<Claim> {
        store.with_fallback(|dir, _| retry_stale(|| Self::create_in(dir, ids)))
    }

    fn create_in(dir: &Path, ids: &[Digest]) -> Result<Claim> {
        {
            let tmp = store_subdir(dir, "tmp", 0o700)?;
            let name = temp_name(CLAIM_LABEL);
            let path = dir.join("tmp").join(&name);
            let fd = rustix::fs::openat(
                &tmp,
                name.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| Error::sys("create claim", &path, e))?;
            if let Err(e) = crate::kernel::sys::ofd_try_write_lock(&fd) {
                // ENOLCK (no lock service): gc then goes by age alone.
                log::debug!("{}: no lock on the claim: {}", path.display(), crate::error::Errno(e));
            }
            let text: String = ids.iter().map(|d| format!("{d}\n")).collect();
            let mut off = 0;
            while off < text.len() {
                match rustix::io::write(&fd, &text.as_bytes()[off..]) {
                    Ok(n) => off += n,
                    Err(e) => {
                        let _ = rustix::fs::unlinkat(&tmp, name.as_str(), rustix::fs::AtFlags::empty());
                        return Err(Error::sys("write claim", &path, e));
                    }
                }
            }
            Ok(Claim { tmp, name, _fd: fd })
        }
    }

    /// The chain IDs a claim file lists (lines that are not IDs are ignored).
    pub fn parse(text: &str) -> Vec<Digest> {
        text.lines().filter_map(|l| Digest::parse(l.trim()).ok()).collect()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        let _ = rustix::fs::unlinkat(&self.tmp, self.name.as_str(), rustix::fs::AtFlags::empty());
    }
}

/// Record `name` -> `id` in the store directory `dir`, atomically, through
/// the `names` directory's fd.
pub fn write_name(dir: &Path, name: &Name, id: &Digest) -> Result<()> {
    write_pointer(dir, "names", name, id)
}

/// Record `<sub>/<name>` -> `id` (`names/` or `confignames/`), atomically.
pub fn write_pointer(dir: &Path, sub: &str, name: &Name, id: &Digest) -> Result<()> {
    let names = store_subdir(dir, sub, 0o755)?;
    // A record that says it already stays: every import of an image would
    // otherwise replace it, and other nodes whose clients still hold the
    // replaced file get ESTALE reading it for a while (GlusterFS).
    let before = read_pointer_in(dir, sub, name);
    if before.as_ref().is_ok_and(|d| d == id) {
        return Ok(());
    }
    // Re-pointing a name is what `--name` is for (a new version of an
    // image), but never silently: the old target may be mounted on nodes.
    if let Ok(old) = &before {
        if sub == "names" {
            log::warn!("name {name}: re-pointed from {old} to {id} in {}", dir.display());
        } else {
            // Follows the name's own warning: said once is enough.
            log::info!("{sub}/{name}: re-pointed from {old} to {id} in {}", dir.display());
        }
    }
    let tmp = format!(".{}.{}.{}", name.file_name(), std::process::id(), unique_suffix());
    let tmp_path = dir.join(sub).join(&tmp);
    let fd = rustix::fs::openat(
        &names,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .map_err(|e| Error::sys("create", &tmp_path, e))?;
    let data = format!("{id}\n");
    let written = rustix::io::write(&fd, data.as_bytes()).and_then(|n| {
        if n == data.len() { rustix::fs::fsync(&fd) } else { Err(Errno::NOSPC) }
    });
    drop(fd);
    let dest = dir.join(sub).join(name.file_name());
    // As for layers: any rename error may be a race another writer won
    // (or a reply lost after our rename went through): a record there that
    // names `id` is success; transient errors are retried.
    let r = written.map_err(|e| Error::sys("write", &tmp_path, e)).and_then(|_| {
        retry_with(
            PUBLISH_TRIES,
            PUBLISH_PAUSE,
            |e| e.errno().is_some_and(transient),
            std::thread::sleep,
            || {
                let e = match rustix::fs::renameat(&names, tmp.as_str(), &names, name.file_name().as_str()) {
                    Ok(()) => return Ok(()),
                    Err(e) => e,
                };
                match read_pointer_in(dir, sub, name) {
                    Ok(d) if d == *id => Ok(()),
                    Err(c) if !transient(e) && c.errno().is_some_and(transient) => Err(c.context("record name")),
                    _ => Err(Error::sys("record name", &dest, e)),
                }
            },
        )
    });
    // Gone if it was renamed; ours to remove in every other case.
    let _ = rustix::fs::unlinkat(&names, tmp.as_str(), rustix::fs::AtFlags::empty());
    r
}

/// `mkdir -p`, also when other nodes create the same directories at the
/// same time: on shared storage the loser of a mkdir race can get EEXIST
/// and then, for a moment, ENOENT or ESTALE when it looks at the winner's
/// directory (GlusterFS), or EIO while the servers settle the new
/// directory's layout between them (GlusterFS DHT, three nodes creating
/// one store at once). A directory that is there in the end is success.
pub fn mkdir_p(p: &Path) -> Result<()> {
    retry_with(
        PUBLISH_TRIES,
        PUBLISH_PAUSE,
        |e| e.errno().is_some_and(|e| transient(e) || e == Errno::NOENT || e == Errno::EXIST),
        std::thread::sleep,
        || match std::fs::create_dir_all(p) {
            Ok(()) => Ok(()),
            Err(e) if std::fs::metadata(p).is_ok_and(|m| m.is_dir()) => {
                log::debug!("{}: created by someone else meanwhile ({e})", p.display());
                Ok(())
            }
            Err(e) => Err(Error::io("create directory", p, &e)),
        },
    )
}

pub fn write_synced(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| Error::io("create", path, &e))?;
    f.write_all(data)
        .and_then(|_| f.sync_all())
        .map_err(|e| {
            let err = Error::io("write", path, &e);
            let _ = std::fs::remove_file(path);
            err
        })
}

pub fn sync_path(p: &Path) -> Result<()> {
    let fd = rustix::fs::open(p, OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::sys("open", p, e))?;
    rustix::fs::fsync(fd.as_fd()).map_err(|e| Error::sys("fsync", p, e))
}

/// The name of a temporary in a store: `<label>.<host>.<pid>.<uniq>`
/// (staging directories, claims, uppers being created, layers being
/// removed). `gc` reads host, pid and creation time back from it
/// (`manage::split_host_pid_uniq`) to tell whose it is and whether its
/// process is gone.
pub fn temp_name(label: &str) -> String {
    format!("{label}.{}.{}.{}", hostname(), std::process::id(), unique_suffix())
}

pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .replace(['/', '.'], "_")
}

pub fn unique_suffix() -> String {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:x}{:08x}", t.as_secs(), t.subsec_nanos())
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn retry_with_follows_the_injected_errno_sequence() {
        // (what op returns, call by call; retry ESTALE only?; want: Ok(value) or
        // Err(errno); calls made; pauses slept in ms)
        type Case = (&'static [Option<Errno>], bool, std::result::Result<u32, Errno>, usize, &'static [u64]);
        let cases: &[Case] = &[
            (&[None], true, Ok(1), 1, &[]),
            (&[Some(Errno::STALE), None], true, Ok(2), 2, &[10]),
            (&[Some(Errno::STALE), Some(Errno::STALE), None], true, Ok(3), 3, &[10, 20]),
            // Five tries, then the last error.
            (&[Some(Errno::STALE); 6], true, Err(Errno::STALE), 5, &[10, 20, 40, 80]),
            // Anything else: at once.
            (&[Some(Errno::NOENT), None], true, Err(Errno::NOENT), 1, &[]),
            (&[Some(Errno::IO), None], true, Err(Errno::IO), 1, &[]),
            (&[Some(Errno::STALE), Some(Errno::ACCESS), None], true, Err(Errno::ACCESS), 2, &[10]),
            // The publishing rule: every transient errno.
            (&[Some(Errno::IO), Some(Errno::STALE), Some(Errno::BUSY), None], false, Ok(4), 4, &[10, 20, 40]),
            (&[Some(Errno::NOTEMPTY), None], false, Err(Errno::NOTEMPTY), 1, &[]),
        ];
        for (i, (seq, stale_only, want, calls, pauses)) in cases.iter().enumerate() {
            let mut left: VecDeque<Option<Errno>> = seq.iter().copied().collect();
            let mut n = 0u32;
            let mut slept = vec![];
            let retryable = |e: &Error| if *stale_only { e.errno() == Some(Errno::STALE) } else { e.errno().is_some_and(transient) };
            let got = retry_with(5, Duration::from_millis(10), retryable, |d| slept.push(d.as_millis() as u64), || {
                n += 1;
                match left.pop_front().expect("called too often") {
                    None => Ok(n),
                    Some(e) => Err(Error::sys("read", "/store/names/x", e)),
                }
            });
            assert_eq!(got.map_err(|e| e.errno().unwrap()), *want, "case {i}");
            assert_eq!(n as usize, *calls, "case {i}");
            assert_eq!(slept, *pauses, "case {i}");
        }
        // retry_stale is that rule with real sleeps.
        let mut n = 0;
        let r = retry_stale(|| {
            n += 1;
            if n < 3 { Err(Error::sys("open", "/x", Errno::STALE)) } else { Ok(n) }
        });
        assert_eq!(r.unwrap(), 3);
    }

    struct TestDir(PathBuf);
    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn meta_for(tag: &[u8], size: u64) -> LayerMeta {
        let diff_id = Digest::of_bytes(tag);
        LayerMeta { chain_id: chain_id(None, &diff_id), diff_id, parent: None, fstype: FsType::Ext4, size, created: 1 }
    }

    /// A staging directory with a `size`-byte layer.img of `fill` bytes.
    fn staged(store: &Store, size: usize, fill: u8) -> Staging {
        let s = Staging::create(store, "layer-test").unwrap();
        std::fs::write(s.path.join("layer.img"), vec![fill; size]).unwrap();
        s
    }

    #[test]
    fn publish_keeps_a_whole_layer_in_the_way_and_refuses_damage() {
        let t = TestDir(std::env::temp_dir().join(format!("sl-publish-{}-{}", std::process::id(), unique_suffix())));
        let store = Store::new(t.0.join("root"), t.0.join("fallback"));
        let meta = meta_for(b"layer", 4096);
        let dest = t.0.join("root/layers").join(meta.chain_id.hex());
        // What is at layers/<hex> when we publish: (files, want Ok or an
        // error containing this).
        let theirs_meta = serde_json::to_string(&meta).unwrap();
        let other_meta = serde_json::to_string(&meta_for(b"other", 4096)).unwrap();
        let short = serde_json::to_string(&LayerMeta { size: 8192, ..meta.clone() }).unwrap();
        type Case<'a> = (&'a str, Vec<(&'a str, Vec<u8>)>, std::result::Result<(), &'a str>);
        let cases: Vec<Case> = vec![
            ("nothing", vec![], Ok(())),
            ("a whole layer (theirs)", vec![("meta.json", theirs_meta.clone().into()), ("layer.img", vec![7; 4096])], Ok(())),
            ("junk, no metadata", vec![("junk", b"x".to_vec())], Err("in the way of publishing and not a whole layer")),
            ("metadata, no image", vec![("meta.json", theirs_meta.clone().into())], Err("layer.img: No such file or directory")),
            ("image of the wrong size", vec![("meta.json", short.into()), ("layer.img", vec![7; 4096])], Err("4096 bytes, its metadata says a file of 8192 bytes")),
            ("another layer's metadata", vec![("meta.json", other_meta.into()), ("layer.img", vec![7; 4096])], Err("metadata names")),
            ("corrupt metadata", vec![("meta.json", b"{".to_vec()), ("layer.img", vec![7; 4096])], Err("corrupt metadata")),
        ];
        for (what, files, want) in cases {
            let _ = std::fs::remove_dir_all(&dest);
            if !files.is_empty() {
                std::fs::create_dir_all(&dest).unwrap();
                for (f, data) in &files {
                    std::fs::write(dest.join(f), data).unwrap();
                }
            }
            let before: Vec<_> = files.iter().map(|(f, _)| std::fs::metadata(dest.join(f)).unwrap().ino()).collect();
            let r = staged(&store, 4096, 1).publish_layer(&meta);
            match (want, r) {
                (Ok(()), Ok(p)) => {
                    assert_eq!(p, dest, "{what}");
                    Store::whole_layer_in(&store.root, &meta.chain_id).unwrap();
                    let img = std::fs::read(dest.join("layer.img")).unwrap();
                    if files.is_empty() {
                        assert_eq!(img, vec![1; 4096], "{what}: ours published");
                    } else {
                        assert_eq!(img, vec![7; 4096], "{what}: theirs kept");
                    }
                }
                (Err(frag), Err(e)) => {
                    let msg = e.to_string();
                    assert!(msg.contains(&dest.display().to_string()) && msg.contains(frag), "{what}: {msg}");
                }
                (want, got) => panic!("{what}: want {want:?}, got {got:?}"),
            }
            // Theirs untouched in every case, ours gone.
            let after: Vec<_> = files.iter().map(|(f, _)| std::fs::metadata(dest.join(f)).unwrap().ino()).collect();
            assert_eq!(before, after, "{what}");
            assert_eq!(std::fs::read_dir(t.0.join("root/tmp")).unwrap().count(), 0, "{what}: staging left");
        }
    }

    #[test]
    fn put_image_renames_on_one_filesystem() {
        let t = TestDir(std::env::temp_dir().join(format!("sl-putimg-{}-{}", std::process::id(), unique_suffix())));
        let store = Store::new(t.0.join("root"), t.0.join("fallback"));
        std::fs::create_dir_all(t.0.join("local")).unwrap();
        let img = t.0.join("local/layer.img");
        std::fs::write(&img, vec![3; 10000]).unwrap();
        let ino = std::fs::metadata(&img).unwrap().ino();
        let s = Staging::create(&store, "layer-put").unwrap();
        assert!(!s.put_image(&img).unwrap(), "renamed, not copied");
        assert!(!img.exists());
        assert_eq!(std::fs::metadata(s.path.join("layer.img")).unwrap().ino(), ino);
        let p = s.path.clone();
        drop(s);
        assert!(!p.exists());
    }

    #[test]
    fn write_name_replaces_and_reads_back() {
        let t = TestDir(std::env::temp_dir().join(format!("sl-name-{}-{}", std::process::id(), unique_suffix())));
        let name = Name::parse("app:1").unwrap();
        let (a, b) = (Digest::of_bytes(b"a"), Digest::of_bytes(b"b"));
        write_name(&t.0, &name, &a).unwrap();
        assert_eq!(read_name_in(&t.0, &name).unwrap(), a);
        write_name(&t.0, &name, &b).unwrap();
        assert_eq!(read_name_in(&t.0, &name).unwrap(), b);
        // Only the record: no temporary left.
        assert_eq!(std::fs::read_dir(t.0.join("names")).unwrap().count(), 1);
        // A directory in the way of the record: the error names it.
        let other = Name::parse("app:2").unwrap();
        std::fs::create_dir_all(t.0.join("names").join(other.file_name()).join("x")).unwrap();
        let e = write_name(&t.0, &other, &a).unwrap_err();
        assert!(e.to_string().starts_with("record name: ") && e.to_string().contains("app:2"), "{e}");
        assert_eq!(std::fs::read_dir(t.0.join("names")).unwrap().count(), 2);
    }
}
