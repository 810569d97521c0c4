//! `sharedloop verify [ID|NAME ...]`
//!
//! Without arguments every stored layer and name; with arguments the chains
//! they name. Per layer copy: the metadata reads and agrees with itself
//! ([`LayerMeta::validate`](crate::store::LayerMeta::validate)); `layer.img` is a regular file of exactly
//! `meta.size` bytes; its superblock magic matches `fstype` (ext4 0xEF53 at
//! byte 1080, xfs `XFSB` at 0, erofs 0xE0F5E1E2 at 1024); its parent is in
//! the store; with `--deep` the filesystem checker runs read-only
//! (`e2fsck -fn`, `xfs_repair -n -f`, `fsck.erofs`). Per name: the record
//! reads and its chain is complete; its image config record, if any, names
//! a config that is there, matches its digest and is for the chain the
//! name points to. Exits with 32 when anything failed.
//! `--json` prints one document instead of lines ([`VerifyReport`]), also
//! when a check failed.

use std::path::Path;

use rustix::fs::{Mode, OFlags};
use serde::Serialize;

use super::inventory::{Inventory, StoredLayer};
use crate::error::{Error, Result, StoreError};
use crate::store::ids::{Digest, LayerRef};
use crate::store::{FsType, Store, Which, openat_beneath};

pub struct VerifyOptions {
    /// Also run the filesystem's checker, read-only.
    pub deep: bool,
    /// One JSON document instead of lines.
    pub json: bool,
}

/// `sharedloop verify --json`. Field names are stable.
///
/// ```text
/// {
///   "checks": [                              in the order checked
///     { "kind": "layer",                     layer | image | store | entry (something
///                                            in the store that is no layer or name)
///       "subject": "sha256:…",               chain ID, image name, or path
///       "store": "root" | "fallback" | null, the store directory it is in, if known
///       "ok": true,
///       "errors": [],                        why it failed
///       "notes": [] }                        what was not checked, e.g. a deep check skipped
///   ],
///   "checked": 4,
///   "failed": 0
/// }
/// ```
#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub checks: Vec<Check>,
    pub checked: usize,
    pub failed: usize,
}

#[derive(Debug, Serialize)]
pub struct Check {
    pub kind: &'static str,
    pub subject: String,
    pub store: Option<Which>,
    pub ok: bool,
    pub errors: Vec<String>,
    pub notes: Vec<String>,
}

/// The filesystem checker, read-only. Ok(None): passed; Ok(Some(note)):
/// not run.
fn deep_check(path: &Path, fstype: FsType) -> std::result::Result<Option<String>, String> {
    let (tool, args): (&str, &[&str]) = match fstype {
        FsType::Ext4 => ("e2fsck", &["-fn"]),
        FsType::Xfs => ("xfs_repair", &["-n", "-f"]),
        FsType::Erofs => ("fsck.erofs", &[]),
    };
    let mut cmd = crate::command::Cmd::new(tool);
    let out = match cmd.args(args).arg(path).output() {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(format!("deep check skipped: {tool} not found"))),
        Err(e) => return Err(format!("run {tool}: {e}")),
    };
    if out.status.success() {
        return Ok(None);
    }
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    let tail: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let tail = tail[tail.len().saturating_sub(3)..].join(" / ");
    Err(format!("{tool} {} {}: {}: {tail}", args.join(" "), path.display(), out.status))
}

/// Everything wrong with one stored copy of a layer (empty: fine), and
/// notes that are not failures.
fn check_layer(inv: &Inventory, l: &StoredLayer, deep: bool) -> (Vec<String>, Vec<String>) {
    let mut fail = Vec::new();
    let mut notes = Vec::new();
    let meta = match &l.meta {
        Ok(m) => Some(m),
        Err(e) => {
            fail.push(e.clone());
            None
        }
    };
    let image = match &l.image {
        Ok(i) => Some(i),
        Err(e) => {
            fail.push(format!("image: {e}"));
            None
        }
    };
    let Some(meta) = meta else { return (fail, notes) };
    if let Some(p) = &meta.parent
        && inv.meta_of(p).is_none()
    {
        fail.push(if inv.has(p) {
            format!("parent {p} has unreadable metadata")
        } else {
            format!("parent {p} is missing from the store")
        });
    }
    let Some(image) = image else { return (fail, notes) };
    if image.size != meta.size {
        fail.push(format!("image is {} bytes, metadata says {}", image.size, meta.size));
    }
    let h = inv.handle(l.which).expect("scanned");
    let rel = format!("layers/{}/layer.img", l.id.hex());
    match openat_beneath(&h.fd, &h.path, &rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty()) {
        Ok(fd) => {
            if let Err(e) = crate::image::superblock::check(&fd, meta.fstype) {
                fail.push(e);
            }
        }
        Err(e) => fail.push(e.to_string()),
    }
    if deep && fail.is_empty() {
        match deep_check(&image.path, meta.fstype) {
            Ok(None) => {}
            Ok(Some(note)) => notes.push(note),
            Err(e) => fail.push(e),
        }
    }
    (fail, notes)
}

pub fn verify(store: &Store, refs: &[String], o: &VerifyOptions) -> Result<()> {
    let inv = Inventory::scan(store)?;
    // What to check: indices into inv.layers and inv.names, plus failures
    // found while selecting.
    // In the order asked for (chains top first), each once.
    let mut layers: Vec<usize> = Vec::new();
    let mut names: Vec<usize> = Vec::new();
    let mut rep = VerifyReport::default();
    // Lines are printed as checks end (a deep check takes a while); the
    // JSON document once all have.
    let mut report = |kind: &'static str, subject: String, store: Option<Which>, why: &[String], notes: &[String]| {
        let ok = why.is_empty();
        rep.checked += 1;
        if !ok {
            rep.failed += 1;
        }
        if !o.json {
            let what = match store {
                // A path says what it is.
                Some(w) if kind == "entry" => format!("{subject} ({w})"),
                Some(w) => format!("{kind} {subject} ({w})"),
                None => format!("{kind} {subject}"),
            };
            if ok {
                let n = if notes.is_empty() { String::new() } else { format!(" ({})", notes.join("; ")) };
                println!("OK    {what}{n}");
            } else {
                println!("FAIL  {what}: {}", why.join("; "));
            }
        }
        rep.checks.push(Check { kind, subject, store, ok, errors: why.to_vec(), notes: notes.to_vec() });
    };
    let add_chain = |top: &Digest, layers: &mut Vec<usize>| {
        let (mut ids, err) = inv.chain(top);
        // A layer with broken metadata ends the chain early: check it too.
        if err.is_some() {
            let next = match ids.last() {
                None => Some(*top),
                Some(l) => inv.meta_of(l).and_then(|m| m.parent),
            };
            ids.extend(next);
        }
        for i in ids.iter().flat_map(|id| inv.by_id.get(id).into_iter().flatten().copied()) {
            if !layers.contains(&i) {
                layers.push(i);
            }
        }
    };
    // The root store is the one checked; its absence (a shared store not
    // mounted on this node) is a failure even with a fallback present.
    for (_, p, e) in store.missing().into_iter().filter(|(w, ..)| *w == Which::Root) {
        report("store", p.display().to_string(), None, &[format!("cannot open it: {e}")], &[]);
    }
    if refs.is_empty() {
        layers.extend(0..inv.layers.len());
        names.extend(0..inv.names.len());
        for p in &inv.problems {
            report("entry", p.path.display().to_string(), Some(p.store), std::slice::from_ref(&p.error), &[]);
        }
    } else {
        for r in refs {
            match LayerRef::parse(r)? {
                LayerRef::Name(n) => {
                    let found: Vec<usize> = (0..inv.names.len()).filter(|&i| inv.names[i].name == n).collect();
                    if found.is_empty() {
                        report("image", n.to_string(), None, &["no such name in the store".into()], &[]);
                    }
                    for i in found {
                        if let Ok(top) = &inv.names[i].target {
                            add_chain(top, &mut layers);
                        }
                        if !names.contains(&i) {
                            names.push(i);
                        }
                    }
                }
                id => match inv.resolve_id(&id) {
                    Ok(d) => add_chain(&d, &mut layers),
                    Err(e) => report("layer", id.to_string(), None, &[e.to_string()], &[]),
                },
            }
        }
    }
    for i in layers {
        let l = &inv.layers[i];
        let (fail, notes) = check_layer(&inv, l, o.deep);
        report("layer", l.id.to_string(), Some(l.which), &fail, &notes);
    }
    for i in names {
        let n = &inv.names[i];
        let mut why: Vec<String> = match &n.target {
            Err(e) => vec![e.clone()],
            Ok(top) => inv.chain(top).1.into_iter().map(|e| format!("chain of {top} is broken: {e}")).collect(),
        };
        let mut notes = vec![];
        if let Some(h) = inv.handle(n.which) {
            match super::configs::check_config(n, &h.path) {
                Ok(note) => notes.extend(note),
                Err(e) => why.push(e),
            }
        }
        report("image", n.name.to_string(), Some(n.which), &why, &notes);
    }
    let (checked, failed) = (rep.checked, rep.failed);
    if o.json {
        println!("{}", serde_json::to_string_pretty(&rep).expect("serialize"));
    } else {
        println!("verify: {checked} checked, {failed} failed");
    }
    if failed > 0 {
        return Err(Error::Store(StoreError::VerifyFailed { failed, checked }));
    }
    Ok(())
}
