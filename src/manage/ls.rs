//! `sharedloop ls`: every name record and stored layer copy of both store
//! directories, with what uses each layer on this node (mounts, loop
//! devices) and whether a user this node does not know holds it; as
//! tables for people or as one JSON document ([`Listing`]) for programs.

use std::path::PathBuf;

use serde::Serialize;

use super::human::{human_size, table};
use super::inventory::{Inventory, Problem};
use super::users::Users;
use crate::error::Result;
use crate::store::ids::Digest;
use crate::store::{LayerMeta, Store, Which};

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
///       "size": 12345678,                    bytes: sum of the chain's meta sizes
///       "error": null }                      or why the chain is incomplete
///   ],
///   "layers": [                              one per stored copy, by chain ID
///     { "chain_id": "sha256:…",
///       "diff_id": "sha256:…",
///       "parent": "sha256:…" | null,
///       "fstype": "ext4" | "xfs" | "erofs",
///       "size": 4194304,                     bytes of layer.img (metadata)
///       "created": 1700000000,               seconds since the epoch
///       "store": "root" | "fallback",
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
    pub error: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct LayerEntry {
    /// chain_id, diff_id, parent, fstype, size, created: as stored.
    #[serde(flatten)]
    pub meta: LayerMeta,
    pub store: Which,
    pub names: Vec<String>,
    pub mounts: usize,
    pub loop_devices: Vec<u32>,
    pub held_elsewhere: bool,
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
                images.push(ImageEntry {
                    name: n.name.to_string(),
                    store: n.which,
                    top: *top,
                    layers: chain.len(),
                    size,
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
        layers.push(LayerEntry {
            meta: meta.clone(),
            store: l.which,
            names: names.get(&l.id).map(|s| s.iter().cloned().collect()).unwrap_or_default(),
            mounts: users.mounts_of(&l.id).len(),
            held_elsewhere: loop_devices.is_empty() && users.held_elsewhere(&inv, &l.id),
            loop_devices,
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
            vec![i.name.clone(), i.top.short(), i.layers.to_string(), human_size(i.size), i.store.to_string()]
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
                x.meta.fstype.to_string(),
                human_size(x.meta.size),
                x.store.to_string(),
                x.mounts.to_string(),
                if x.held_elsewhere { "yes".into() } else { "-".into() },
                if x.names.is_empty() { "-".into() } else { x.names.join(",") },
            ]
        })
        .collect();
    format!(
        "{}\n{}",
        table(&["NAME", "TOP", "LAYERS", "SIZE", "STORE"], &images),
        table(&["CHAIN ID", "DIFF ID", "PARENT", "FSTYPE", "SIZE", "STORE", "MOUNTS", "ELSEWHERE", "NAMES"], &layers)
    )
}

pub fn ls(store: &Store, json: bool) -> Result<()> {
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
