//! `sharedloop gc`
//!
//! Removes layers that are not needed (see the module `manage`), except those younger
//! than `--min-age` (default 1 hour; age from the metadata's `created` and
//! the layer directory's mtime, whichever is younger): `add` without
//! `--name` publishes layers that are unreferenced until the top of the
//! image is added and named, and a multi-layer add must not lose its lower
//! layers in between. For the same reason a layer published after an `add`
//! or `import` still at work began (the oldest live staging directory in
//! `tmp/`, see `temporaries`) is young too, so an import that runs longer than the
//! grace period keeps its lower layers. A young layer keeps its ancestors.
//! Layers in use (and their ancestors) are kept whatever their age, and
//! no layer is removed when a store directory could not be read completely.
//!
//! It also removes what crashed processes left (see `temporaries`) and
//! image configs no name needs (see `configs`). Sizes are those of
//! `usage`, the figures `ls` shows: bytes freed are allocated bytes
//! (`st_blocks * 512`), the apparent size beside them. `--json` prints one
//! document instead of lines ([`GcReport`]).
//!
//! Races the grace period does not cover: `add --parent P` checks that P
//! exists when it starts and publishes its layer when it ends; a `gc` or
//! `rm` that removes P in between (P unreferenced and older than the grace)
//! leaves the new layer with a missing parent (`verify` reports it).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use super::configs::config_garbage;
use serde::Serialize;

use super::human::{human_age, human_size};
use super::inventory::Inventory;
use super::removal::{Removed, RemovedLayer, children_first, remove_entry, remove_layers};
use super::usage::Usage;
use super::temporaries::{claimed, stale_temporaries, work_in_progress_since};
use super::users::Users;
use crate::error::Result;
use crate::store::ids::Digest;
use crate::store::{self, Store, Which};

pub struct GcOptions {
    pub dry_run: bool,
    /// Unreferenced layers younger than this stay.
    pub min_age: Duration,
    /// One JSON document instead of lines.
    pub json: bool,
}

/// `sharedloop gc --json`. Field names are stable.
///
/// ```text
/// {
///   "dry_run": false,                        true: nothing was removed, this is what would be
///   "layers": [                              unreferenced layer copies, children first
///     { "chain_id": "sha256:…", "store": "root",
///       "allocated_bytes": 28672, "apparent_bytes": 4194714 } ],
///   "temporaries": [                         what crashed processes left
///     { "path": "/var/lib/sharedloop/root/tmp/…", "store": "root",
///       "allocated_bytes": 4096, "apparent_bytes": 0,
///       "reason": "staging, process 123 on this host is gone" } ],
///   "removed": 2,                            items (layer copies and temporaries)
///   "allocated_bytes": 32768,                all of them summed: bytes freed
///   "apparent_bytes": 4194714
/// }
/// ```
#[derive(Debug, Serialize)]
pub struct GcReport {
    pub dry_run: bool,
    pub layers: Vec<RemovedLayer>,
    pub temporaries: Vec<RemovedTemporary>,
    pub removed: usize,
    #[serde(flatten)]
    pub total: Usage,
}

#[derive(Debug, Serialize)]
pub struct RemovedTemporary {
    #[serde(with = "crate::bytes::path")]
    pub path: PathBuf,
    pub store: Which,
    #[serde(flatten)]
    pub usage: Usage,
    pub reason: String,
}

impl GcReport {
    fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string_pretty(self).expect("serialize"));
            return;
        }
        let verb = if self.dry_run { "would remove" } else { "removed" };
        for l in &self.layers {
            println!(
                "{verb} layer {} ({}, {}, apparent {}): not referenced",
                l.chain_id,
                l.store,
                human_size(l.usage.allocated_bytes),
                human_size(l.usage.apparent_bytes)
            );
        }
        for t in &self.temporaries {
            println!(
                "{verb} {} ({}, {}, apparent {}): {}",
                t.path.display(),
                t.store,
                human_size(t.usage.allocated_bytes),
                human_size(t.usage.apparent_bytes),
                t.reason
            );
        }
        let b = self.total.allocated_bytes;
        let a = human_size(self.total.apparent_bytes);
        if self.removed == 0 {
            println!("gc: nothing to remove");
        } else if self.dry_run {
            println!("gc: would remove {} items, free {b} bytes ({}, apparent {a})", self.removed, human_size(b));
        } else {
            println!("gc: removed {} items, freed {b} bytes ({}, apparent {a})", self.removed, human_size(b));
        }
    }
}

/// "1h", "30m", "90s", "2d", "1h30m", "0"; a bare number is seconds.
pub fn parse_duration(s: &str) -> std::result::Result<Duration, String> {
    let t = s.trim();
    if t.is_empty() {
        return Err("empty duration".into());
    }
    if let Ok(n) = t.parse::<u64>() {
        return Ok(Duration::from_secs(n));
    }
    let mut total: u64 = 0;
    let mut num = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86400,
            'w' => 7 * 86400,
            _ => return Err(format!("{s:?}: unknown unit {c:?} (use s, m, h, d or w)")),
        };
        let n: u64 = num.parse().map_err(|_| format!("{s:?}: a number must come before {c:?}"))?;
        total = n.checked_mul(unit).and_then(|v| total.checked_add(v)).ok_or_else(|| format!("{s:?}: too long"))?;
        num.clear();
    }
    if !num.is_empty() {
        return Err(format!("{s:?}: number without a unit at the end"));
    }
    Ok(Duration::from_secs(total))
}

pub fn gc(store: &Store, o: &GcOptions) -> Result<()> {
    let inv = Inventory::scan(store)?;
    // A missing fallback is the usual case; a missing root is worth a word.
    for (_, p, e) in store.missing().into_iter().filter(|(w, ..)| *w == Which::Root) {
        log::warn!("root store {}: {e}; collecting the fallback only", p.display());
    }
    let users = Users::scan();
    let now = store::now_secs();
    let min_age = o.min_age.as_secs();

    // Layers.
    let mut doomed: Vec<Digest> = Vec::new();
    if inv.incomplete {
        log::warn!("{}", inv.refuse_if_incomplete("gc: layers not collected").unwrap_err());
    } else {
        // Published since an add or import still at work began (a minute
        // of slack for clocks): that one may be about to name it.
        let busy_since = work_in_progress_since(&inv, now).map(|t| t.saturating_sub(60));
        let young = |id: &Digest| {
            inv.copies(id).any(|l| {
                let created = l.meta.as_ref().map(|m| m.created).unwrap_or(0).max(l.mtime);
                now.saturating_sub(created) < min_age || busy_since.is_some_and(|t| created >= t)
            })
        };
        // Why each kept layer stays (`gc -v` says it): the first reason found.
        let mut why: BTreeMap<Digest, String> = BTreeMap::new();
        for n in &inv.names {
            if let Ok(top) = &n.target {
                for id in inv.chain(top).0 {
                    why.entry(id).or_insert_with(|| format!("in the chain of image {} ({})", n.name, n.which));
                }
            }
        }
        let claims = claimed(&inv, now);
        for id in inv.closure(claims.iter().copied()) {
            why.entry(id).or_insert_with(|| "claimed by an import or add still at work".into());
        }
        for id in inv.ids().filter(|id| young(id)) {
            why.entry(*id).or_insert_with(|| {
                format!("published less than --min-age {} ago, or since an add or import still at work began", human_age(min_age))
            });
        }
        let roots = inv
            .names
            .iter()
            .filter_map(|n| n.target.as_ref().ok().copied())
            .chain(inv.ids().filter(|id| young(id)).copied())
            .chain(claims);
        let mut needed = inv.closure(roots);
        // What is in use stays with its ancestors (asked of the candidates
        // only: a lock query may cost a round trip to a file server).
        let busy: Vec<Digest> = inv
            .ids()
            .filter(|id| !needed.contains(id))
            .filter(|id| match users.in_use(&inv, id) {
                Some(w) => {
                    why.insert(**id, format!("it {w}"));
                    true
                }
                None => false,
            })
            .copied()
            .collect();
        needed.extend(inv.closure(busy));
        for id in &needed {
            match why.get(id) {
                Some(w) => log::info!("layer {id} kept: {w}"),
                None => log::info!("layer {id} kept: the parent of a layer that stays"),
            }
        }
        // A layer whose metadata cannot be read is left to `verify`.
        let unknown: BTreeSet<Digest> = inv.ids().filter(|id| inv.meta_of(id).is_none()).copied().collect();
        for id in &unknown {
            log::warn!("layer {id}: unreadable metadata, not collected (see sharedloop verify)");
        }
        doomed = children_first(&inv, inv.ids().filter(|id| !needed.contains(id) && !unknown.contains(id)).copied());
    }

    // Temporaries.
    let mut garbage = Vec::new();
    for (which, h) in &inv.dirs {
        stale_temporaries(*which, h, &users, now, &mut garbage);
        config_garbage(&inv, *which, h, now, min_age, &mut garbage);
    }

    let mut removed = Removed::default();
    let mut first_err = None;
    if o.dry_run {
        removed.layers = doomed.iter().flat_map(|id| inv.copies(id)).map(RemovedLayer::of).collect();
    } else if !doomed.is_empty()
        && let Err(e) = remove_layers(&inv, &doomed, &[], "unreferenced layers", true, &mut removed)
    {
        // Reported with what was removed before it.
        first_err = Some(e);
    }
    let mut temporaries = Vec::new();
    // A layer removal that failed stops gc there, as before temporaries.
    let garbage = if first_err.is_some() { vec![] } else { garbage };
    for g in garbage {
        if !o.dry_run
            && let Err(e) = remove_entry(inv.handle(g.which).expect("scanned"), g.sub, &g.name)
        {
            log::warn!("{e}");
            first_err.get_or_insert(e);
            continue;
        }
        temporaries.push(RemovedTemporary { path: g.path, store: g.which, usage: g.usage, reason: g.why });
    }
    let total = removed.layers.iter().map(|l| l.usage).chain(temporaries.iter().map(|t| t.usage)).sum();
    let report = GcReport {
        dry_run: o.dry_run,
        removed: removed.layers.len() + temporaries.len(),
        layers: removed.layers,
        temporaries,
        total,
    };
    report.print(o.json);
    match first_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        let ok: &[(&str, u64)] = &[("0", 0), ("0s", 0), ("90", 90), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), ("1w", 604800)];
        for (s, want) in ok {
            assert_eq!(parse_duration(s), Ok(Duration::from_secs(*want)), "{s}");
        }
        for s in ["", "h", "1x", "1h30", "-1s"] {
            assert!(parse_duration(s).is_err(), "{s}");
        }
    }
}
