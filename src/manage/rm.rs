//! `sharedloop rm NAME|ID ...`
//!
//! Removes the name records (from both directories) and then every layer of
//! their chains that is no longer needed. A bare layer ID (or unique prefix)
//! removes that layer and the part of its chain nothing else needs; it is
//! refused when another layer depends on it (the dependent is named) or a
//! name's chain contains it. Nothing is changed when any layer to be removed
//! is used by a live mount on this node (the mount is named), has its
//! image attached to a loop device, or locked. `--name-only` removes the
//! name records only (this works while the image is mounted; `gc` takes the
//! layers later). `--dry-run` says what would go. Errors: a malformed
//! argument is a usage error (exit 1); an unknown name or ID, a needed
//! layer or one in use exit with 32 (store errors, as everywhere).
//!
//! Sizes are those `ls` shows for the same layer copies (`usage`):
//! allocated bytes, what leaves the disk, with the apparent size beside.
//! `--json` prints one document instead of lines ([`RmReport`]).
//!
//! What is needed: see the module `manage`; how layers leave the store:
//! `removal`.

use std::collections::BTreeSet;

use super::human::human_size;
use super::inventory::{Inventory, StoredName};
use serde::Serialize;

use super::removal::{Removed, RemovedLayer, RemovedName, children_first, remove_layers, remove_name};
use super::usage::Usage;
use super::temporaries::claimed;
use super::users::Users;
use crate::error::{Error, Missing, Result};
use crate::store::ids::{Digest, LayerRef, Name};
use crate::store::{self, Store};

pub struct RmOptions {
    /// Remove the name records only; layers stay (for `gc`).
    pub name_only: bool,
    pub dry_run: bool,
    /// One JSON document instead of lines.
    pub json: bool,
}

/// `sharedloop rm --json`. Field names are stable.
///
/// ```text
/// {
///   "dry_run": false,                        true: nothing was removed, this is what would be
///   "names": [ { "name": "app:1", "store": "root" } ],
///   "layers": [                              children before parents
///     { "chain_id": "sha256:…", "store": "root",
///       "allocated_bytes": 28672,            as `ls` shows it: what leaves the disk
///       "apparent_bytes": 4194714 } ],
///   "allocated_bytes": 28672,                the layers summed: bytes freed
///   "apparent_bytes": 4194714
/// }
/// ```
#[derive(Debug, Serialize)]
pub struct RmReport {
    pub dry_run: bool,
    pub names: Vec<RemovedName>,
    pub layers: Vec<RemovedLayer>,
    #[serde(flatten)]
    pub total: Usage,
}

impl RmReport {
    fn new(dry_run: bool, r: Removed) -> RmReport {
        let total = r.layers.iter().map(|l| l.usage).sum();
        RmReport { dry_run, names: r.names, layers: r.layers, total }
    }

    fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string_pretty(self).expect("serialize"));
            return;
        }
        let verb = if self.dry_run { "would remove" } else { "removed" };
        for n in &self.names {
            println!("{verb} name {} ({})", n.name, n.store);
        }
        for l in &self.layers {
            println!(
                "{verb} layer {} ({}, {}, apparent {})",
                l.chain_id,
                l.store,
                human_size(l.usage.allocated_bytes),
                human_size(l.usage.apparent_bytes)
            );
        }
        if !self.layers.is_empty() {
            let b = self.total.allocated_bytes;
            let verb = if self.dry_run { "would free" } else { "freed" };
            println!("{verb} {b} bytes ({}, apparent {})", human_size(b), human_size(self.total.apparent_bytes));
        }
    }
}

pub fn rm(store: &Store, targets: &[String], o: &RmOptions) -> Result<()> {
    if targets.is_empty() {
        return Err(Error::Usage("rm: name what to remove (NAME or layer ID)".into()));
    }
    let inv = Inventory::scan(store)?;
    let mut gone_names: BTreeSet<Name> = BTreeSet::new();
    let mut layer_targets: Vec<Digest> = Vec::new();
    for t in targets {
        match LayerRef::parse(t)? {
            LayerRef::Name(n) => {
                if !inv.names.iter().any(|s| s.name == n) {
                    return Err(Error::not_found(
                        Missing::Image,
                        n,
                        format!("{} nor {}", inv.root.display(), inv.fallback.display()),
                    ));
                }
                gone_names.insert(n);
            }
            r if o.name_only => {
                return Err(Error::Usage(format!("rm --name-only: {r} is a layer ID, not a name")));
            }
            r => layer_targets.push(inv.resolve_id(&r)?),
        }
    }
    let name_records: Vec<&StoredName> = inv.names.iter().filter(|n| gone_names.contains(&n.name)).collect();
    let what = targets.join(" ");
    if o.name_only {
        let mut out = Removed::default();
        let mut result = Ok(());
        for n in &name_records {
            if !o.dry_run
                && let Err(e) = remove_name(inv.handle(n.which).expect("scanned"), n)
            {
                result = Err(e);
                break;
            }
            out.names.push(RemovedName { name: n.name.to_string(), store: n.which });
        }
        if result.is_ok() || !out.is_empty() {
            RmReport::new(o.dry_run, out).print(o.json);
        }
        return result;
    }
    inv.refuse_if_incomplete(&format!("cannot remove {what}"))?;

    // The chains to remove, and what must stay: the chains of the other
    // names and the ancestors of every layer outside the removed chains.
    let tops = name_records.iter().filter_map(|n| n.target.as_ref().ok().copied()).chain(layer_targets.iter().copied());
    let candidates = inv.closure(tops);
    let remaining: Vec<&StoredName> = inv.names.iter().filter(|n| !gone_names.contains(&n.name)).collect();
    let keep_roots = remaining
        .iter()
        .filter_map(|n| n.target.as_ref().ok().copied())
        .chain(inv.ids().filter(|id| !candidates.contains(id)).copied())
        .chain(claimed(&inv, store::now_secs()));
    let needed = inv.closure(keep_roots);
    let by_imports = inv.closure(claimed(&inv, store::now_secs()));

    let mut refusals = Vec::new();
    for t in &layer_targets {
        if !needed.contains(t) {
            continue;
        }
        let dependents: Vec<String> = inv
            .children_of(t)
            .into_iter()
            .filter(|c| needed.contains(c) || !candidates.contains(c))
            .map(|c| c.to_string())
            .collect();
        let images: Vec<String> = remaining
            .iter()
            .filter(|n| n.target.as_ref().is_ok_and(|top| inv.chain(top).0.contains(t)))
            .map(|n| n.name.to_string())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let mut why = Vec::new();
        match dependents.as_slice() {
            [] => {}
            [one] => why.push(format!("layer {one} depends on it")),
            many => why.push(format!("layers {} depend on it", many.join(", "))),
        }
        match images.as_slice() {
            [] => {}
            [one] => why.push(format!("it is in the chain of image {one}")),
            many => why.push(format!("it is in the chain of images {}", many.join(", "))),
        }
        if by_imports.contains(t) {
            why.push("an import still at work uses it".into());
        }
        refusals.push((t, why.join("; ")));
    }
    match refusals.as_slice() {
        [] => {}
        [(t, why)] if layer_targets.len() == 1 && targets.len() == 1 => {
            return Err(Error::InUse(format!("cannot remove layer {t}: {why}")));
        }
        many => {
            let m: Vec<String> = many.iter().map(|(t, why)| format!("layer {t} is needed: {why}")).collect();
            return Err(Error::InUse(format!("cannot remove {what}: {}", m.join("; "))));
        }
    }
    for n in &name_records {
        if let Ok(top) = &n.target
            && let (_, Some(e)) = inv.chain(top)
        {
            log::warn!("image {}: chain incomplete ({e}); removing what is there", n.name);
        }
    }
    let doomed = children_first(&inv, candidates.difference(&needed).copied());

    // Refuse before changing anything.
    let users = Users::scan();
    let busy: Vec<String> =
        doomed.iter().filter_map(|id| users.in_use(&inv, id).map(|why| format!("layer {id} {why}"))).collect();
    if !busy.is_empty() {
        return Err(Error::InUse(format!("cannot remove {what}: {}", busy.join("; "))));
    }
    let mut out = Removed::default();
    if o.dry_run {
        out.names = name_records.iter().map(|n| RemovedName { name: n.name.to_string(), store: n.which }).collect();
        out.layers = doomed.iter().flat_map(|id| inv.copies(id)).map(RemovedLayer::of).collect();
        RmReport::new(true, out).print(o.json);
        return Ok(());
    }
    // What was removed is reported also when an error stops the removal.
    let result = remove_layers(&inv, &doomed, &name_records, &what, false, &mut out);
    if result.is_ok() || !out.is_empty() {
        RmReport::new(false, out).print(o.json);
    }
    result
}
