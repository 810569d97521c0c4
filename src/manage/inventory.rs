//! The inventory: every layer and name in both store directories (root and
//! fallback), read in one pass over their `layers/` and `names/`, and the
//! questions `ls`, `rm`, `gc` and `verify` ask of it (chains, ancestors,
//! which names hold a layer, what an ID prefix means).
//!
//! Everything is read through store directory fds
//! (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`): a symlink planted in a shared
//! store is refused, never followed.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::Arc;

use rustix::fs::{Mode, OFlags};
use serde::Serialize;

use super::FileId;
use super::usage::{Usage, usage_beneath};
use crate::error::{Error, Missing, Result, StoreError};
use crate::store::ids::{Digest, LayerRef, Name};
use crate::store::{self, DirHandle, LayerMeta, MAX_LAYERS, Store, Which, falls_back, openat_beneath};

#[derive(Clone, Debug)]
pub struct ImageInfo {
    pub path: PathBuf,
    /// st_size
    pub size: u64,
    /// st_blocks * 512
    pub allocated: u64,
    pub(super) file: FileId,
}

/// One stored copy of a layer.
#[derive(Debug)]
pub struct StoredLayer {
    pub id: Digest,
    pub which: Which,
    /// `layers/<hex>`
    pub path: PathBuf,
    pub meta: std::result::Result<LayerMeta, String>,
    pub image: std::result::Result<ImageInfo, String>,
    /// What the layer directory occupies (see `usage`): the size every
    /// command reports for this copy.
    pub usage: std::result::Result<Usage, String>,
    /// mtime of the layer directory, seconds since the epoch.
    pub mtime: u64,
}

/// One name record.
#[derive(Debug)]
pub struct StoredName {
    pub name: Name,
    pub which: Which,
    pub path: PathBuf,
    pub target: std::result::Result<Digest, String>,
}

/// Something in the store that is not what it should be.
#[derive(Clone, Debug, Serialize)]
pub struct Problem {
    pub store: Which,
    pub path: PathBuf,
    pub error: String,
}

/// Every layer and name in both store directories.
pub struct Inventory {
    pub root: PathBuf,
    pub fallback: PathBuf,
    /// The store directories that exist, root first, canonical paths.
    pub dirs: Vec<(Which, Arc<DirHandle>)>,
    /// Root copies before fallback copies.
    pub layers: Vec<StoredLayer>,
    pub names: Vec<StoredName>,
    pub problems: Vec<Problem>,
    /// A `layers/` or `names/` directory could not be read: references are
    /// unknown, so nothing may be removed on their account.
    pub incomplete: bool,
    pub(super) by_id: BTreeMap<Digest, Vec<usize>>,
}

/// Entries of the subdirectory `sub` of a store directory (opened beneath
/// it, never through a symlink): (file name, path), sorted. A missing
/// directory is empty. Names that are not UTF-8 are none of ours: skipped.
pub(super) fn list_dir(h: &DirHandle, sub: &str) -> Result<Vec<(String, PathBuf)>> {
    let dir = h.path.join(sub);
    let fd = match openat_beneath(&h.fd, &h.path, sub, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) if e.errno() == Some(rustix::io::Errno::NOENT) => return Ok(vec![]),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for ent in rustix::fs::Dir::read_from(&fd).map_err(|e| Error::sys("read directory", &dir, e))? {
        let ent = ent.map_err(|e| Error::sys("read directory", &dir, e))?;
        let Ok(name) = ent.file_name().to_str() else { continue };
        if name != "." && name != ".." {
            out.push((name.to_string(), dir.join(name)));
        }
    }
    out.sort();
    Ok(out)
}

fn stat_image(h: &DirHandle, id: &Digest) -> std::result::Result<ImageInfo, String> {
    let rel = format!("layers/{}/layer.img", id.hex());
    let path = h.path.join(&rel);
    let fd = openat_beneath(&h.fd, &h.path, &rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())
        .map_err(|e| e.to_string())?;
    let st = rustix::fs::fstat(&fd).map_err(|e| Error::sys("stat", &path, e).to_string())?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(format!("{}: not a regular file", path.display()));
    }
    Ok(ImageInfo {
        path,
        size: st.st_size as u64,
        allocated: st.st_blocks as u64 * 512,
        file: FileId { dev: st.st_dev as u64, ino: st.st_ino as u64 },
    })
}

impl Inventory {
    pub fn scan(store: &Store) -> Result<Inventory> {
        let mut inv = Inventory {
            root: store.root.clone(),
            fallback: store.fallback.clone(),
            dirs: vec![],
            layers: vec![],
            names: vec![],
            problems: vec![],
            incomplete: false,
            by_id: BTreeMap::new(),
        };
        for which in [Which::Root, Which::Fallback] {
            let h = match store.handle(which) {
                Ok(h) => h,
                // Missing or unreadable: as with the fallback rule, empty.
                Err(e) if e.errno().is_some_and(falls_back) => continue,
                Err(e) => return Err(e),
            };
            if inv.dirs.iter().any(|(_, d)| d.path == h.path) {
                continue; // root and fallback are one directory
            }
            inv.scan_layers(which, &h);
            inv.scan_names(which, &h);
            inv.dirs.push((which, h));
        }
        if inv.dirs.is_empty() {
            // Neither store is there: an error, so that `verify` or `gc` of
            // a shared store that is not mounted never reports success.
            store.require()?;
        }
        for (i, l) in inv.layers.iter().enumerate() {
            inv.by_id.entry(l.id).or_default().push(i);
        }
        Ok(inv)
    }

    fn problem(&mut self, store: Which, path: PathBuf, error: impl Into<String>) {
        self.problems.push(Problem { store, path, error: error.into() });
    }

    /// The entries of `sub` (see `list_dir`). One that cannot be read is a
    /// problem, and leaves the inventory incomplete.
    fn entries(&mut self, which: Which, h: &DirHandle, sub: &str) -> Vec<(String, PathBuf)> {
        list_dir(h, sub).unwrap_or_else(|e| {
            self.incomplete = true;
            self.problem(which, h.path.join(sub), e.to_string());
            vec![]
        })
    }

    fn scan_layers(&mut self, which: Which, h: &DirHandle) {
        for (name, path) in self.entries(which, h, "layers") {
            let Some(id) = Digest::from_hex(&name) else {
                self.problem(which, path, "not a layer (name is not a chain ID)");
                continue;
            };
            let md = match std::fs::symlink_metadata(&path) {
                Ok(md) => md,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // removed meanwhile
                Err(e) => {
                    self.problem(which, path.clone(), Error::io("stat", &path, &e).to_string());
                    continue;
                }
            };
            if !md.is_dir() {
                self.problem(which, path, "not a layer (not a directory)");
                continue;
            }
            let meta = Store::read_meta_in(&h.path, &id).map_err(|e| e.to_string());
            let image = stat_image(h, &id);
            let usage = usage_beneath(h, &format!("layers/{name}")).map_err(|e| e.to_string());
            self.layers.push(StoredLayer { id, which, path, meta, image, usage, mtime: md.mtime().max(0) as u64 });
        }
    }

    fn scan_names(&mut self, which: Which, h: &DirHandle) {
        for (file, path) in self.entries(which, h, "names") {
            if file.starts_with('.') {
                continue; // a record being written (gc's business)
            }
            let Some(name) = Name::from_file_name(&file).filter(|n| n.file_name() == file) else {
                self.problem(which, path, "not a name record (invalid name)");
                continue;
            };
            // The one way a name record is read (store::read_name_in): as
            // the server has it, riding out a record another node has just
            // replaced. It lists names/ again for each name: fine for the
            // tens to hundreds of names a store holds.
            let target = store::read_name_in(&h.path, &name).map_err(|e| e.to_string());
            self.names.push(StoredName { name, which, path, target });
        }
    }

    pub fn has(&self, id: &Digest) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn ids(&self) -> impl Iterator<Item = &Digest> {
        self.by_id.keys()
    }

    pub fn copies<'a>(&'a self, id: &Digest) -> impl Iterator<Item = &'a StoredLayer> + 'a {
        self.by_id.get(id).into_iter().flatten().map(|&i| &self.layers[i])
    }

    /// The metadata of the first copy that has valid metadata (root first).
    pub fn meta_of(&self, id: &Digest) -> Option<&LayerMeta> {
        self.copies(id).find_map(|l| l.meta.as_ref().ok())
    }

    /// The usage of the copy a mount uses (the first readable one, root
    /// first): what a layer counts for in an image's size.
    pub fn usage_of(&self, id: &Digest) -> Option<Usage> {
        self.copies(id).find_map(|l| l.usage.as_ref().ok().copied())
    }

    /// `starts` and all their ancestors (as far as metadata tells).
    pub fn closure(&self, starts: impl IntoIterator<Item = Digest>) -> BTreeSet<Digest> {
        let mut out = BTreeSet::new();
        let mut stack: Vec<Digest> = starts.into_iter().collect();
        while let Some(id) = stack.pop() {
            if !out.insert(id) {
                continue;
            }
            if let Some(p) = self.meta_of(&id).and_then(|m| m.parent) {
                stack.push(p);
            }
        }
        out
    }

    /// The chain of `top`, top first, as far as it goes; the error says why
    /// it stops early.
    pub fn chain(&self, top: &Digest) -> (Vec<Digest>, Option<String>) {
        let mut ids = Vec::new();
        let mut next = Some(*top);
        while let Some(id) = next {
            if ids.contains(&id) || ids.len() >= MAX_LAYERS {
                return (ids, Some(format!("chain of {top}: parent cycle or more than {MAX_LAYERS} layers")));
            }
            match self.meta_of(&id) {
                Some(m) => {
                    ids.push(id);
                    next = m.parent;
                }
                None if self.has(&id) => return (ids, Some(format!("layer {id} has unreadable metadata"))),
                None => return (ids, Some(format!("layer {id} is missing"))),
            }
        }
        (ids, None)
    }

    /// Names (deduplicated) whose chain contains each layer.
    pub(super) fn names_by_layer(&self) -> BTreeMap<Digest, BTreeSet<String>> {
        let mut out: BTreeMap<Digest, BTreeSet<String>> = BTreeMap::new();
        for n in &self.names {
            if let Ok(top) = &n.target {
                for id in self.chain(top).0 {
                    out.entry(id).or_default().insert(n.name.to_string());
                }
            }
        }
        out
    }

    /// Layers with a copy whose parent is `id`.
    pub(super) fn children_of(&self, id: &Digest) -> BTreeSet<Digest> {
        self.layers
            .iter()
            .filter(|l| l.meta.as_ref().ok().and_then(|m| m.parent).as_ref() == Some(id))
            .map(|l| l.id)
            .collect()
    }

    pub(super) fn handle(&self, which: Which) -> Option<&Arc<DirHandle>> {
        self.dirs.iter().find(|(w, _)| *w == which).map(|(_, h)| h)
    }

    /// Resolve a user's layer reference against what is stored.
    pub(super) fn resolve_id(&self, r: &LayerRef) -> Result<Digest> {
        let searched = || format!("{} nor {}", self.root.display(), self.fallback.display());
        match r {
            LayerRef::Id(d) if self.has(d) => Ok(*d),
            LayerRef::Id(d) => Err(Error::not_found(Missing::Layer, d, searched())),
            LayerRef::Prefix(p) => {
                let found: Vec<&Digest> = self.ids().filter(|d| d.hex().starts_with(p.as_str())).collect();
                match found.as_slice() {
                    [] => Err(Error::not_found(Missing::IdPrefix, p, searched())),
                    [one] => Ok(**one),
                    many => Err(Error::Store(StoreError::Ambiguous {
                        prefix: p.to_string(),
                        matches: many.iter().map(|d| d.to_string()).collect(),
                    })),
                }
            }
            LayerRef::Name(n) => Err(Error::Internal(format!("{n} is not a layer ID"))),
        }
    }

    pub(super) fn refuse_if_incomplete(&self, what: &str) -> Result<()> {
        if self.incomplete {
            let p: Vec<String> = self.problems.iter().map(|p| p.error.clone()).collect();
            return Err(Error::Store(StoreError::Incomplete { what: what.to_string(), problems: p }));
        }
        Ok(())
    }
}
