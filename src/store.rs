//! The layer store: a root directory (often shared storage) and a fallback
//! directory, with the original driver's rule between them.
//!
//! Layout of each store directory:
//!
//! ```text
//! layers/<64 hex chain id>/meta.json   parent link, diff id, fstype, size
//! layers/<64 hex chain id>/layer.img   the read-only filesystem image
//! names/<encoded name>                 "sha256:<chain id>\n"
//! uppers/<encoded name>.img            writable upper images
//! tmp/                                 staging; renamed into place whole
//! ```
//!
//! Every path below a store directory is opened with openat2(RESOLVE_BENEATH
//! | RESOLVE_NO_SYMLINKS) from the store directory's fd, so a symlink planted
//! in a (shared, maybe writable by others) store cannot redirect us.

use std::collections::BTreeSet;
use std::fmt;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ids::{Digest, LayerRef, Name, chain_id};

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
    pub fn validate(&self, expect: &Digest) -> Result<()> {
        if &self.chain_id != expect {
            return Err(Error::Store(format!(
                "metadata names {} but is stored as {expect}",
                self.chain_id
            )));
        }
        let computed = chain_id(self.parent.as_ref(), &self.diff_id);
        if computed != self.chain_id {
            return Err(Error::Store(format!(
                "metadata of {expect} is inconsistent: parent {} and diff id {} give chain id {computed}",
                self.parent.map(|p| p.to_string()).unwrap_or_else(|| "none".into()),
                self.diff_id
            )));
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

const RESOLVE: ResolveFlags = ResolveFlags::BENEATH
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS);

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

pub fn openat_beneath(
    dfd: &OwnedFd,
    dir: &Path,
    rel: &str,
    flags: OFlags,
    mode: Mode,
) -> Result<OwnedFd> {
    let path = dir.join(rel);
    rustix::fs::openat2(dfd, rel, flags | OFlags::CLOEXEC, mode, RESOLVE).map_err(|e| {
        let what = if e == Errno::LOOP || e == Errno::XDEV {
            "refusing symlink or path outside the store"
        } else {
            "open"
        };
        Error::sys(what, path, e)
    })
}

/// A small file in as few reads as possible (one, for metadata).
fn read_small(fd: OwnedFd, path: &Path, limit: u64) -> Result<String> {
    let mut buf = vec![0u8; 4096];
    let mut len = 0;
    loop {
        let n = rustix::io::read(&fd, &mut buf[len..]).map_err(|e| Error::sys("read", path, e))?;
        len += n;
        if n == 0 || len as u64 >= limit {
            break;
        }
        if len == buf.len() {
            buf.resize(buf.len() * 2, 0);
        }
    }
    buf.truncate(len.min(limit as usize));
    String::from_utf8(buf).map_err(|_| Error::Store(format!("{}: not UTF-8 text", path.display())))
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
                Err(e2) => Err(Error::Store(format!("{e}; fallback: {e2}"))),
            },
            Err(e) => Err(e),
        }
    }

    fn meta_rel(id: &Digest) -> String {
        format!("layers/{}/meta.json", id.hex())
    }

    /// Read and validate one layer's metadata from one store directory.
    pub fn read_meta_in(dir: &Path, id: &Digest) -> Result<LayerMeta> {
        let h = DirHandle { path: dir.to_path_buf(), fd: open_dir(dir)? };
        Self::read_meta_at(&h, id)
    }

    fn read_meta_at(h: &DirHandle, id: &Digest) -> Result<LayerMeta> {
        let rel = Self::meta_rel(id);
        let fd = openat_beneath(&h.fd, &h.path, &rel, OFlags::RDONLY, Mode::empty())?;
        let path = h.path.join(&rel);
        let text = read_small(fd, &path, 1 << 16)?;
        let meta: LayerMeta = serde_json::from_str(&text).map_err(|e| {
            Error::Store(format!("layer {id}: {}: corrupt metadata: {e}", path.display()))
        })?;
        meta.validate(id)
            .map_err(|e| e.context(&format!("layer {id}: {}", path.display())))?;
        Ok(meta)
    }

    /// Find a layer by full chain ID, root first, and open its image.
    pub fn open_layer(&self, id: &Digest) -> Result<Layer> {
        self.with_fallback(|_, which| {
            let h = self.handle(which)?;
            let dir = &h.path;
            let meta = Self::read_meta_at(&h, id)?;
            let rel = format!("layers/{}/layer.img", id.hex());
            let image = openat_beneath(&h.fd, dir, &rel, OFlags::RDONLY, Mode::empty()).map_err(|e| match e.errno() {
                // Publishing is atomic, so metadata without its image is damage,
                // not "not here": say so instead of looking in the fallback.
                Some(Errno::NOENT) => Error::Store(format!(
                    "{}: image missing beside its metadata (damaged store?)",
                    dir.join(&rel).display()
                )),
                _ => e,
            })?;
            Ok(Layer {
                meta,
                which,
                image_path: dir.join(rel),
                image,
            })
        })
        .map_err(|e| match e.errno() {
            Some(Errno::NOENT) => Error::Store(format!(
                "layer {id}: not found in {} nor {}",
                self.root.display(),
                self.fallback.display()
            )),
            // Store errors already name the layer; system errors do not.
            Some(_) => e.context(&format!("layer {id}")),
            None if e.to_string().starts_with(&format!("layer {id}")) => e,
            None => e.context(&format!("layer {id}")),
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
        let rel = format!("names/{}", name.file_name());
        self.with_fallback(|dir, _| {
            let fd = open_beneath(dir, &rel, OFlags::RDONLY, Mode::empty())?;
            let path = dir.join(&rel);
            let text = read_small(fd, &path, 200)?;
            Digest::parse(text.trim()).map_err(|_| {
                Error::Store(format!("name {name}: {}: corrupt name record", path.display()))
            })
        })
        .map_err(|e| match e.errno() {
            Some(Errno::NOENT) => Error::Store(format!(
                "image {name}: no such name in {} nor {}",
                self.root.display(),
                self.fallback.display()
            )),
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
                    0 => Err(Error::Store(format!(
                        "layer sha256:{p}: no layer with this ID prefix in {} nor {}",
                        self.root.display(),
                        self.fallback.display()
                    ))),
                    1 => Ok(*found.iter().next().expect("one")),
                    n => Err(Error::Store(format!(
                        "layer sha256:{p}: ambiguous ID prefix, {n} layers match: {}",
                        found.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")
                    ))),
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
                return Err(Error::Store(format!("chain of {top}: parent cycle at {id}")));
            }
            if out.len() == MAX_LAYERS {
                return Err(Error::Store(format!(
                    "chain of {top}: more than {MAX_LAYERS} layers, overlayfs takes at most {MAX_LAYERS}"
                )));
            }
            let layer = self.open_layer(&id).map_err(|e| {
                if out.is_empty() {
                    e
                } else {
                    Error::Store(format!("chain of {top} is broken: {e}"))
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
        match self.with_fallback(|_, which| Self::read_meta_at(&*self.handle(which)?, id).map(|_| which)) {
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
    let dfd = open_dir(dir)?;
    match rustix::fs::mkdirat(&dfd, sub, Mode::from_raw_mode(mode)) {
        Ok(()) | Err(Errno::EXIST) => {}
        Err(e) => return Err(Error::sys("create directory", dir.join(sub), e)),
    }
    openat_beneath(&dfd, dir, sub, OFlags::PATH | OFlags::DIRECTORY, Mode::empty())
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
            let name = format!("{label}.{}.{}.{}", hostname(), std::process::id(), unique_suffix());
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

    /// Move a finished layer (layer.img and meta.json in the staging
    /// directory) into place with one rename. If another process or node
    /// published the same layer first, ours is dropped and theirs kept.
    pub fn publish_layer(mut self, meta: &LayerMeta) -> Result<PathBuf> {
        let meta_path = self.path.join("meta.json");
        write_synced(&meta_path, serde_json::to_string_pretty(meta).expect("serialize").as_bytes())?;
        sync_path(&self.path.join("layer.img"))?;
        sync_path(&self.path)?;
        let layers = store_subdir(&self.store_dir, "layers", 0o755)?;
        let dest = self.store_dir.join("layers").join(meta.chain_id.hex());
        // The layer directory is readable by all, as mounts need nothing more.
        let _ = rustix::fs::chmodat(&self.tmp, self.name.as_str(), Mode::from_raw_mode(0o755), rustix::fs::AtFlags::empty());
        match rustix::fs::renameat(&self.tmp, self.name.as_str(), &layers, meta.chain_id.hex().as_str()) {
            Ok(()) => {
                self.done = true;
                let _ = sync_path(&self.store_dir.join("layers"));
                Ok(dest)
            }
            // Someone else won the race: theirs is as good as ours, if it
            // is whole; a directory without metadata is damage, not a race.
            Err(Errno::EXIST) | Err(Errno::NOTEMPTY) => match Store::read_meta_in(&self.store_dir, &meta.chain_id) {
                Ok(_) => Ok(dest),
                Err(e) => Err(Error::Store(format!("{}: in the way of publishing and not a whole layer: {e}", dest.display()))),
            },
            Err(e) => Err(Error::sys("publish layer", &dest, e)),
        }
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
}

pub const CLAIM_LABEL: &str = "claim";

impl Claim {
    pub fn create(store: &Store, ids: &[Digest]) -> Result<Claim> {
        store.with_fallback(|dir, _| {
            let tmp = store_subdir(dir, "tmp", 0o700)?;
            let name = format!("{CLAIM_LABEL}.{}.{}.{}", hostname(), std::process::id(), unique_suffix());
            let path = dir.join("tmp").join(&name);
            let fd = rustix::fs::openat(
                &tmp,
                name.as_str(),
                OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                Mode::from_raw_mode(0o600),
            )
            .map_err(|e| Error::sys("create claim", &path, e))?;
            let claim = Claim { tmp, name };
            let text: String = ids.iter().map(|d| format!("{d}\n")).collect();
            let mut off = 0;
            while off < text.len() {
                off += rustix::io::write(&fd, &text.as_bytes()[off..]).map_err(|e| Error::sys("write claim", &path, e))?;
            }
            Ok(claim)
        })
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
    let names = store_subdir(dir, "names", 0o755)?;
    let tmp = format!(".{}.{}.{}", name.file_name(), std::process::id(), unique_suffix());
    let tmp_path = dir.join("names").join(&tmp);
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
    let dest = dir.join("names").join(name.file_name());
    let r = written
        .map_err(|e| Error::sys("write", &tmp_path, e))
        .and_then(|_| rustix::fs::renameat(&names, tmp.as_str(), &names, name.file_name().as_str()).map_err(|e| Error::sys("record name", &dest, e)));
    if r.is_err() {
        let _ = rustix::fs::unlinkat(&names, tmp.as_str(), rustix::fs::AtFlags::empty());
    }
    r
}

pub fn mkdir_p(p: &Path) -> Result<()> {
    std::fs::create_dir_all(p).map_err(|e| Error::io("create directory", p, &e))
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
