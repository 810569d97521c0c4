//! `sharedloop ls`: every name record and stored layer copy of both store
//! directories, with what uses each layer on this node (mounts, loop
//! devices) and whether a user this node does not know holds it; as
//! tables for people or as one JSON document ([`Listing`]) for programs.
//! `sharedloop ls IMAGE` (a name, a chain ID or a unique prefix): that
//! image's layers bottom to top ([`ImageView`]).
//!
//! Sizes are those of `usage`: allocated bytes (`st_blocks * 512` of the
//! layer directory) first, apparent bytes beside them; `rm`, `gc` and
//! `status` report the same figures for the same layer.

use std::path::PathBuf;

use serde::Serialize;

use super::human::{human_size, table};
use super::inventory::{Inventory, Problem};
use super::usage::Usage;
use super::users::Users;
use crate::error::{Error, Missing, Result};
use crate::store::ids::{Digest, LayerRef};
use crate::store::{FsType, LayerMeta, Store, Which};

/// `sharedloop ls --json`: one JSON document. Field names are stable.
///
/// ```text
/// {
///   "root": "/var/lib/sharedloop/root",      store root as configured
///   "fallback": "/var/lib/sharedloop/private",
///   "images": [                              one per name record, by name
///     { "name": "debian:12",
///       "store": "root",                     where the record is: root | fallback
///       "top": "sha256:…",                   chain ID the name points to
///       "layers": 3,                         layers in its chain (those found)
///       "size": 12345678,                    bytes: sum of the chain's meta sizes (apparent image sizes)
///       "allocated_bytes": 81920,            sum of its layers' allocated bytes (the copy a mount uses)
///       "apparent_bytes": 12349774,          sum of its layers' apparent bytes
///       "error": null }                      or why the chain is incomplete
///   ],
///   "layers": [                              one per stored copy, by chain ID
///     { "chain_id": "sha256:…",
///       "diff_id": "sha256:…",
///       "parent": "sha256:…" | null,
///       "fstype": "ext4" | "xfs" | "erofs",
///       "compression": "lz4",                only for an LZ4-compressed erofs image
///       "size": 4194304,                     bytes of layer.img as the metadata records it
///       "created": 1700000000,               seconds since the epoch
///       "store": "root" | "fallback",
///       "allocated_bytes": 28672,            st_blocks*512 of the layer directory and its files
///       "apparent_bytes": 4194714,           st_size of its files (layer.img, meta.json)
///       "names": ["debian:12"],              names whose chain holds it
///       "mounts": 1,                         live sharedloop mounts on this node using it
///       "loop_devices": [7],                 loop devices its image is attached to
///       "held_elsewhere": false }            locked by a user this node does not know:
///                                            a mount on another node sharing the store
///   ],
///   "problems": [                            what could not be read
///     { "store": "root", "path": "…", "error": "…" }
///   ]
/// }
/// ```
#[derive(Debug, Serialize)]
pub struct Listing {
    pub root: PathBuf,
    pub fallback: PathBuf,
    pub images: Vec<ImageEntry>,
    pub layers: Vec<LayerEntry>,
    pub problems: Vec<Problem>,
}

#[derive(Debug, Serialize)]
pub struct ImageEntry {
    pub name: String,
    pub store: Which,
    pub top: Digest,
    pub layers: usize,
    pub size: u64,
    #[serde(flatten)]
    pub usage: Usage,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LayerEntry {
    /// chain_id, diff_id, parent, fstype, size, created: as stored.
    #[serde(flatten)]
    pub meta: LayerMeta,
    pub store: Which,
    /// Zero (and an entry in `problems`) if the directory could not be walked.
    #[serde(flatten)]
    pub usage: Usage,
    pub names: Vec<String>,
    pub mounts: usize,
    pub loop_devices: Vec<u32>,
    pub held_elsewhere: bool,
    /// `Some("lz4")` for an erofs image with LZ4-compressed files (its
    /// superblock's incompat bits, read here: 1152 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<&'static str>,
}

/// "lz4" if the erofs image in the layer directory `dir` has LZ4-compressed
/// files, from its superblock. Opened the way every store file is (no
/// symlink followed, nothing but a regular file opened, never blocking):
/// a damaged or hostile store may hold a FIFO or a device there, which
/// `ls` must list, not hang on.
fn compression_of(dir: &std::path::Path) -> Option<&'static str> {
    let dfd = crate::store::open_dir(dir).ok()?;
    let fd = crate::store::openat_beneath(&dfd, dir, "layer.img", rustix::fs::OFlags::RDONLY, rustix::fs::Mode::empty()).ok()?;
    let head = crate::image::superblock::read_at(&fd, 0, 1024 + 128).ok()?;
    crate::image::superblock::erofs_lz4(&head).then_some("lz4")
}

pub fn listing(store: &Store) -> Result<Listing> {
    let inv = Inventory::scan(store)?;
    let users = Users::scan();
    let mut problems = inv.problems.clone();
    let mut images = Vec::new();
    for n in &inv.names {
        match &n.target {
            Ok(top) => {
                let (chain, error) = inv.chain(top);
                let size = chain.iter().filter_map(|id| inv.meta_of(id)).map(|m| m.size).sum();
                let usage = chain.iter().filter_map(|id| inv.usage_of(id)).sum();
                images.push(ImageEntry {
                    name: n.name.to_string(),
                    store: n.which,
                    top: *top,
                    layers: chain.len(),
                    size,
                    usage,
                    error,
                });
            }
            Err(e) => problems.push(Problem { store: n.which, path: n.path.clone(), error: e.clone() }),
        }
    }
    images.sort_by(|a, b| a.name.cmp(&b.name).then((a.store as u8).cmp(&(b.store as u8))));
    let names = inv.names_by_layer();
    let mut layers = Vec::new();
    for l in &inv.layers {
        let meta = match &l.meta {
            Ok(m) => m,
            Err(e) => {
                problems.push(Problem { store: l.which, path: l.path.clone(), error: e.clone() });
                continue;
            }
        };
        let loop_devices = match &l.image {
            Ok(i) => users.loops_of_file(i.file, &i.path),
            Err(e) => {
                problems.push(Problem { store: l.which, path: l.path.join("layer.img"), error: e.clone() });
                vec![]
            }
        };
        let usage = match &l.usage {
            Ok(u) => *u,
            Err(e) => {
                problems.push(Problem { store: l.which, path: l.path.clone(), error: e.clone() });
                Usage::default()
            }
        };
        layers.push(LayerEntry {
            meta: meta.clone(),
            store: l.which,
            usage,
            names: names.get(&l.id).map(|s| s.iter().cloned().collect()).unwrap_or_default(),
            mounts: users.mounts_of(&l.id).len(),
            held_elsewhere: loop_devices.is_empty() && users.held_elsewhere(&inv, &l.id),
            loop_devices,
            compression: if meta.fstype == FsType::Erofs { compression_of(&l.path) } else { None },
        });
    }
    layers.sort_by(|a, b| a.meta.chain_id.cmp(&b.meta.chain_id).then((a.store as u8).cmp(&(b.store as u8))));
    Ok(Listing { root: inv.root.clone(), fallback: inv.fallback.clone(), images, layers, problems })
}

/// The human form of `ls`.
pub fn render(l: &Listing) -> String {
    let images: Vec<Vec<String>> = l
        .images
        .iter()
        .map(|i| {
            vec![
                i.name.clone(),
                i.top.short(),
                i.layers.to_string(),
                human_size(i.usage.allocated_bytes),
                human_size(i.usage.apparent_bytes),
                i.store.to_string(),
            ]
        })
        .collect();
    let opt = |d: &Option<Digest>| d.map(|d| d.short()).unwrap_or_else(|| "-".into());
    let layers: Vec<Vec<String>> = l
        .layers
        .iter()
        .map(|x| {
            vec![
                x.meta.chain_id.short(),
                x.meta.diff_id.short(),
                opt(&x.meta.parent),
                match x.compression {
                    Some(c) => format!("{}+{c}", x.meta.fstype),
                    None => x.meta.fstype.to_string(),
                },
                human_size(x.usage.allocated_bytes),
                human_size(x.usage.apparent_bytes),
                x.store.to_string(),
                x.mounts.to_string(),
                if x.held_elsewhere { "yes".into() } else { "-".into() },
                if x.names.is_empty() { "-".into() } else { x.names.join(",") },
            ]
        })
        .collect();
    format!(
        "{}\n{}",
        table(&["NAME", "TOP", "LAYERS", "SIZE", "APPARENT", "STORE"], &images),
        table(
            &["CHAIN ID", "DIFF ID", "PARENT", "FSTYPE", "SIZE", "APPARENT", "STORE", "MOUNTS", "ELSEWHERE", "NAMES"],
            &layers
        )
    )
}

/// `sharedloop ls IMAGE --json`: one image, its layers bottom to top.
/// Field names are stable.
///
/// ```text
/// {
///   "image": "debian:12" | null,             the name asked for (null: asked by layer ID)
///   "store": "root" | "fallback" | null,     where that name record is (the one a mount reads)
///   "top": "sha256:…",
///   "allocated_bytes": 81920,                the layers below summed (the copy a mount uses)
///   "apparent_bytes": 12349774,
///   "layers": [                              bottom (base) first, top last
///     { "chain_id": "sha256:…",
///       "diff_id": "sha256:…",
///       "parent": "sha256:…" | null,
///       "fstype": "ext4" | "xfs" | "erofs",
///       "stores": ["root", "fallback"],      every store directory holding a copy, root first
///       "allocated_bytes": 28672,            of the first copy (the one a mount uses)
///       "apparent_bytes": 4194714,
///       "mounts": [                          live sharedloop mounts on this node using it
///         { "target": "/srv/app", "source": "debian:12" } ],
///       "loop_devices": [7],                 loop devices its image is attached to
///       "held_elsewhere": false }            locked by a user this node does not know
///   ],
///   "error": null                            or why the chain is incomplete
/// }
/// ```
#[derive(Debug, Serialize)]
pub struct ImageView {
    pub image: Option<String>,
    pub store: Option<Which>,
    pub top: Digest,
    #[serde(flatten)]
    pub usage: Usage,
    pub layers: Vec<ImageLayer>,
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ImageLayer {
    pub chain_id: Digest,
    pub diff_id: Option<Digest>,
    pub parent: Option<Digest>,
    pub fstype: Option<FsType>,
    pub stores: Vec<Which>,
    #[serde(flatten)]
    pub usage: Usage,
    pub mounts: Vec<MountUse>,
    pub loop_devices: Vec<u32>,
    pub held_elsewhere: bool,
}

#[derive(Debug, Serialize)]
pub struct MountUse {
    #[serde(with = "crate::bytes::path")]
    pub target: PathBuf,
    pub source: String,
}

/// The view of one image: `what` is a name, a chain ID or a unique prefix.
pub fn image_view(store: &Store, what: &str) -> Result<ImageView> {
    let r = LayerRef::parse(what)?;
    let inv = Inventory::scan(store)?;
    let (image, record_store, top) = match &r {
        LayerRef::Name(n) => {
            // The record a mount reads: the root's, else the fallback's.
            let rec = inv.names.iter().find(|s| &s.name == n).ok_or_else(|| {
                Error::not_found(Missing::Image, n, format!("{} nor {}", inv.root.display(), inv.fallback.display()))
            })?;
            let top = rec.target.clone().map_err(|e| Error::bad_image(format!("image {n}"), e))?;
            (Some(n.to_string()), Some(rec.which), top)
        }
        id => (None, None, inv.resolve_id(id)?),
    };
    let users = Users::scan();
    let (mut chain, error) = inv.chain(&top);
    // The layer that ends a chain early (unreadable metadata) is shown too.
    if error.is_some() {
        let next = match chain.last() {
            None => Some(top),
            Some(l) => inv.meta_of(l).and_then(|m| m.parent),
        };
        chain.extend(next.filter(|id| inv.has(id)));
    }
    chain.reverse();
    let layers: Vec<ImageLayer> = chain
        .iter()
        .map(|id| {
            let meta = inv.meta_of(id);
            let mut stores: Vec<Which> = inv.copies(id).map(|l| l.which).collect();
            stores.dedup();
            let mut loop_devices: Vec<u32> = inv
                .copies(id)
                .filter_map(|l| l.image.as_ref().ok())
                .flat_map(|i| users.loops_of_file(i.file, &i.path))
                .collect();
            loop_devices.sort();
            loop_devices.dedup();
            ImageLayer {
                chain_id: *id,
                diff_id: meta.map(|m| m.diff_id),
                parent: meta.and_then(|m| m.parent),
                fstype: meta.map(|m| m.fstype),
                stores,
                usage: inv.usage_of(id).unwrap_or_default(),
                mounts: users
                    .mounts_of(id)
                    .into_iter()
                    .map(|m| MountUse { target: m.target.clone(), source: m.source.clone() })
                    .collect(),
                held_elsewhere: loop_devices.is_empty() && users.held_elsewhere(&inv, id),
                loop_devices,
            }
        })
        .collect();
    Ok(ImageView { image, store: record_store, top, usage: layers.iter().map(|l| l.usage).sum(), layers, error })
}

/// The human form of `ls IMAGE`.
pub fn render_image(v: &ImageView) -> String {
    let what = match (&v.image, v.store) {
        (Some(n), Some(w)) => format!("image {n} ({w})"),
        _ => format!("layer {}", v.top),
    };
    let mut o = format!(
        "{what}: top {}, {} layers, {} allocated, {} apparent\n",
        v.top,
        v.layers.len(),
        human_size(v.usage.allocated_bytes),
        human_size(v.usage.apparent_bytes)
    );
    let rows: Vec<Vec<String>> = v
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let mut users: Vec<String> = l.mounts.iter().map(|m| m.target.display().to_string()).collect();
            if users.is_empty() {
                users.extend(l.loop_devices.iter().map(|n| format!("/dev/loop{n}")));
            }
            if l.held_elsewhere {
                users.push("another node".into());
            }
            let stores: Vec<String> = l.stores.iter().map(|w| w.to_string()).collect();
            vec![
                (i + 1).to_string(),
                l.chain_id.to_string(),
                l.fstype.map(|f| f.to_string()).unwrap_or_else(|| "?".into()),
                human_size(l.usage.allocated_bytes),
                human_size(l.usage.apparent_bytes),
                stores.join(","),
                if users.is_empty() { "-".into() } else { users.join(",") },
            ]
        })
        .collect();
    o.push_str(&table(&["#", "CHAIN ID", "FSTYPE", "SIZE", "APPARENT", "STORE", "USED BY"], &rows));
    o
}

pub fn ls(store: &Store, image: Option<&str>, json: bool) -> Result<()> {
    if let Some(what) = image {
        let v = image_view(store, what)?;
        if json {
            println!("{}", serde_json::to_string_pretty(&v).expect("serialize"));
        } else {
            print!("{}", render_image(&v));
        }
        if let Some(e) = &v.error {
            log::warn!("{what}: chain incomplete: {e}");
        }
        return Ok(());
    }
    let l = listing(store)?;
    // A missing fallback is the usual case; a missing root is worth a word.
    for (_, p, e) in store.missing().into_iter().filter(|(w, ..)| *w == Which::Root) {
        log::warn!("root store {}: {e}; listing the fallback only", p.display());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&l).expect("serialize"));
        return Ok(());
    }
    print!("{}", render(&l));
    for i in l.images.iter().filter(|i| i.error.is_some()) {
        log::warn!("image {} ({}): incomplete: {}", i.name, i.store, i.error.as_deref().unwrap_or(""));
    }
    for p in &l.problems {
        log::warn!("{} store: {}: {}", p.store, p.path.display(), p.error);
    }
    Ok(())
}
