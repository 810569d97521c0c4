//! Image configs (`configs/`, `confignames/`, see `store::configs`) for
//! `gc` and `verify`.
//!
//! `gc` removes, per store directory: pointers whose name is gone from
//! that directory's `names/` (removed by a sharedloop that predates
//! configs), then configs no remaining pointer names; both only once older
//! than `--min-age` (an import writes its config a moment before its
//! pointer), and nothing at all in a directory whose names or pointers
//! could not all be read. Dot-temporaries of both directories are judged
//! like those of `names/` (`temporaries`).

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;

use super::human::human_age;
use super::inventory::{Inventory, StoredName, list_dir};
use super::temporaries::Garbage;
use super::usage::Usage;
use crate::import::config::ImageConfig;
use crate::store::configs::{self, CONFIGNAMES, CONFIGS};
use crate::store::ids::{Digest, Name};
use crate::store::{DirHandle, Which};

fn age(p: &std::path::Path, now: u64) -> u64 {
    std::fs::symlink_metadata(p).map(|m| now.saturating_sub(m.mtime().max(0) as u64)).unwrap_or(0)
}

/// Unneeded pointers and configs of one store directory.
pub(super) fn config_garbage(inv: &Inventory, which: Which, h: &DirHandle, now: u64, min_age: u64, out: &mut Vec<Garbage>) {
    if inv.incomplete {
        return;
    }
    let (pointers, blobs) = match (list_dir(h, CONFIGNAMES), list_dir(h, CONFIGS)) {
        (Ok(p), Ok(b)) => (p, b),
        (Err(e), _) | (_, Err(e)) => {
            log::warn!("{e}: image configs not collected");
            return;
        }
    };
    let names: BTreeSet<&Name> = inv.names.iter().filter(|n| n.which == which).map(|n| &n.name).collect();
    let mut wanted: BTreeSet<Digest> = BTreeSet::new();
    let mut complete = true;
    for (file, path) in pointers.iter().filter(|(f, _)| !f.starts_with('.')) {
        let Some(name) = Name::from_file_name(file) else {
            log::warn!("{}: not a name record, left alone", path.display());
            continue;
        };
        let target = configs::read_config_name_in(&h.path, &name);
        if !names.contains(&name) {
            let a = age(path, now);
            if a >= min_age {
                out.push(Garbage { which, sub: CONFIGNAMES, name: file.clone(), path: path.clone(), why: format!("image config of {name}, a name that is gone"), usage: Usage::of_file(path) });
                continue;
            }
            log::info!("{}: kept: its name is gone, but it is younger than --min-age {}", path.display(), human_age(min_age));
        }
        match target {
            Ok(Some(d)) => {
                wanted.insert(d);
            }
            Ok(None) => {}
            Err(e) => {
                log::warn!("{e}: image configs of {} not collected", h.path.display());
                complete = false;
            }
        }
    }
    if !complete {
        return;
    }
    for (file, path) in blobs.iter().filter(|(f, _)| !f.starts_with('.')) {
        let Some(d) = configs::parse_config_file(file) else {
            log::warn!("{}: not an image config file name, left alone", path.display());
            continue;
        };
        if wanted.contains(&d) {
            continue;
        }
        let a = age(path, now);
        if a < min_age {
            log::info!("{}: kept: unreferenced, but younger than --min-age {}", path.display(), human_age(min_age));
            continue;
        }
        out.push(Garbage { which, sub: CONFIGS, name: file.clone(), path: path.clone(), why: "image config no name points to".into(), usage: Usage::of_file(path) });
    }
}

/// The config record of a name: Ok(note) when it is whole (None: it has
/// none), Err(why) when it is damaged or belongs to another image.
pub(super) fn check_config(n: &StoredName, dir: &std::path::Path) -> std::result::Result<Option<String>, String> {
    let Some(d) = configs::read_config_name_in(dir, &n.name).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let data = configs::read_config_in(dir, &d).map_err(|e| format!("image config {d}: {e}"))?;
    let cfg = ImageConfig::parse(&data, &format!("image config {d}")).map_err(|e| e.to_string())?;
    let top = cfg.top_chain(&format!("image config {d}")).map_err(|e| e.to_string())?;
    match (&n.target, top) {
        (Ok(t), Some(c)) if *t == c => Ok(Some(format!("image config {d}"))),
        (Ok(t), c) => Err(format!(
            "image config {d} is for chain {}, the name points to {t} (re-pointed by a sharedloop without image configs?); bundle ignores it",
            c.map(|c| c.to_string()).unwrap_or_else(|| "none".into())
        )),
        (Err(_), _) => Ok(Some(format!("image config {d}"))),
    }
}
