//! `--fstype erofs`: a layer's tar stream written straight into an erofs
//! image (`image::erofs_writer`), in one pass, with no unpacked tree.
//!
//! The blob is read, decompressed and hashed by `unpack::stream_layer`,
//! each entry checked by `unpack::parse_entry` — the same code, checks and
//! refusals as the tree path — and then given here to the writer with the
//! tree path's semantics, which this mirrors step by step (`TreeWriter`):
//! whiteouts as char 0/0, `.wh..wh..opq` as trusted.overlay.opaque=y,
//! unlisted parents with the lower layers' metadata, hard links to lower
//! files copied up, later entries replacing earlier ones. What the tree
//! path learns from the tree (is this path a directory, a symlink, a
//! whiteout?) is kept here in a map of this layer's paths; the lower
//! layers are read through `lower` as there.
//!
//! The image is completed (`Writer::finish`) only once both digests
//! matched; on any error the unfinished writer removes it.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::path::Path;

use rustix::fs::FileType;

use super::lower::Lower;
use super::unpack::{
    Counters, Expect, Meta, OPAQUE_XATTR, Op, Parsed, Sink, Stats, hidden_below, join, lower_dir_meta, lower_link_target, read_xattrs,
    show, split_last, stream_layer, ts,
};
use crate::error::{Error, Result};
use crate::image::erofs_writer::{self as ew, Entry, Kind, Writer};

/// What a path of this layer is, as far as later entries care.
#[derive(Clone)]
enum St {
    /// Its metadata, so that a later entry or an opaque marker can add to it.
    Dir(Meta),
    Whiteout,
    Symlink,
    Other,
}

struct ErofsSink {
    w: Writer,
    paths: HashMap<Vec<u8>, St>,
    opaque: HashSet<Vec<u8>>,
    root_listed: bool,
}

/// Streams the layer blob `raw` into the erofs image `out`; returns the
/// stats and the image's size. `uuid`: the image's (from the diff ID, so
/// that the same tar gives the same bytes).
pub fn stream_erofs(
    raw: impl Read,
    out: &Path,
    uuid: [u8; 16],
    lz4: bool,
    lower: &mut Lower,
    expect: &Expect,
    tick: &dyn Fn(u64),
) -> Result<(Stats, u64)> {
    let mut paths = HashMap::new();
    paths.insert(Vec::new(), St::Dir(Meta::default_dir(ts(0, 0))));
    let mut w = Writer::create(out, uuid)?;
    w.compress_lz4(lz4);
    let mut sink = ErofsSink { w, paths, opaque: HashSet::new(), root_listed: false };
    let stats = stream_layer(raw, out, &mut sink, lower, expect, tick)?;
    // Both digests matched: only now is the image made whole.
    let size = sink.w.finish()?;
    Ok((stats, size))
}

fn wmeta(m: &Meta) -> ew::Meta {
    ew::Meta {
        mode: m.mode,
        uid: m.uid,
        gid: m.gid,
        mtime: m.mtime.tv_sec,
        mtime_nsec: m.mtime.tv_nsec as u32,
        xattrs: m.xattrs.clone(),
    }
}

/// `old` with `new` set on it, as fsetxattr does on an existing directory.
fn merge(old: &Meta, new: &Meta) -> Meta {
    let mut x = new.xattrs.clone();
    for (k, v) in &old.xattrs {
        if !x.iter().any(|(n, _)| n == k) {
            x.push((k.clone(), v.clone()));
        }
    }
    x.sort();
    Meta { xattrs: x, ..new.clone() }
}

fn with_opaque(m: &Meta) -> Meta {
    merge(m, &Meta { xattrs: vec![(OPAQUE_XATTR.as_bytes().to_vec(), b"y".to_vec())], ..m.clone() })
}

impl ErofsSink {
    fn add(&mut self, rel: &[u8], kind: Kind, meta: &Meta, data: &mut dyn Read) -> Result<()> {
        self.w.add(&Entry { path: rel, kind, meta: wmeta(meta) }, data)
    }

    fn add_dir(&mut self, rel: &[u8], meta: Meta) -> Result<()> {
        self.add(rel, Kind::Dir, &meta, &mut std::io::empty())?;
        self.paths.insert(rel.to_vec(), St::Dir(meta));
        Ok(())
    }

    fn make_opaque(&mut self, rel: &[u8]) -> Result<()> {
        let Some(St::Dir(m)) = self.paths.get(rel) else { unreachable!("made opaque only once a directory") };
        let m = with_opaque(m);
        self.add_dir(rel, m)?;
        self.opaque.insert(rel.to_vec());
        Ok(())
    }

    /// Room for a new entry at `rel`: a directory there goes with all
    /// below it (the writer replaces the entry itself).
    fn clear(&mut self, rel: &[u8]) -> Option<St> {
        let old = self.paths.remove(rel);
        if let Some(St::Dir(_)) = old {
            let prefix = join(rel, b"");
            self.paths.retain(|k, _| !k.starts_with(&prefix));
        }
        old
    }

    /// `TreeWriter::dir_opt`: directory `rel` of this layer, its missing
    /// parts made with the lower layers' metadata; None below a
    /// non-directory of this layer; a symlink on the way is refused.
    fn dir_opt(&mut self, rel: &[u8], lower: &mut Lower, hint: rustix::fs::Timespec) -> Result<Option<()>> {
        if rel.is_empty() || matches!(self.paths.get(rel), Some(St::Dir(_))) {
            return Ok(Some(()));
        }
        let mut prefix: Vec<u8> = Vec::new();
        for comp in rel.split(|&b| b == b'/') {
            prefix = join(&prefix, comp);
            match self.paths.get(&prefix) {
                Some(St::Dir(_)) => {}
                Some(St::Whiteout) => {
                    // Deleted from below by this layer, now a new directory.
                    self.add_dir(&prefix, with_opaque(&Meta::default_dir(hint)))?;
                    self.opaque.insert(prefix.clone());
                }
                Some(St::Symlink) => {
                    return Err(Error::refused(
                        format!("layer entry below {:?}", show(&prefix)),
                        "it is a symlink in this layer",
                    ));
                }
                Some(St::Other) => return Ok(None),
                None => {
                    let hidden = hidden_below(&self.opaque, split_last(&prefix).0);
                    let meta = lower_dir_meta(&prefix, hidden, lower, hint)?;
                    self.add_dir(&prefix, meta)?;
                }
            }
        }
        Ok(Some(()))
    }

    fn dir(&mut self, rel: &[u8], lower: &mut Lower, hint: rustix::fs::Timespec) -> Result<()> {
        self.dir_opt(rel, lower, hint)?.ok_or_else(|| {
            Error::refused(
                format!("layer entry below {:?}", show(rel)),
                "a part of it is not a directory in this layer",
            )
        })
    }

    fn special(&mut self, rel: &[u8], ft: FileType, dev: u64, meta: &Meta) -> Result<()> {
        let (major, minor) = (rustix::fs::major(dev), rustix::fs::minor(dev));
        let kind = match ft {
            FileType::CharacterDevice => Kind::CharDev { major, minor },
            FileType::BlockDevice => Kind::BlockDev { major, minor },
            _ => Kind::Fifo,
        };
        self.clear(rel);
        self.add(rel, kind, meta, &mut std::io::empty())?;
        self.paths
            .insert(rel.to_vec(), if ft == FileType::CharacterDevice && dev == 0 { St::Whiteout } else { St::Other });
        Ok(())
    }

    /// `TreeWriter::hardlink`.
    fn hardlink(&mut self, rel: &[u8], target: &[u8], lower: &mut Lower) -> Result<()> {
        let bad = |why: String| Error::bad_image(format!("layer entry {:?}", show(rel)), why);
        if target == rel || target.is_empty() {
            return Err(bad("hardlink to itself or to the root".into()));
        }
        let (tp, _) = split_last(target);
        // Where the target's directory is in this layer (TreeWriter::probe_dir).
        let mut here_dir = true;
        let mut prefix: Vec<u8> = Vec::new();
        for comp in tp.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            prefix = join(&prefix, comp);
            match self.paths.get(&prefix) {
                Some(St::Dir(_)) => {}
                None => {
                    here_dir = false;
                    break;
                }
                Some(St::Symlink) => {
                    return Err(Error::refused(
                        format!("hardlink {:?}", show(rel)),
                        format!("its target {:?} is below a symlink", show(target)),
                    ));
                }
                Some(_) => {
                    return Err(bad(format!(
                        "hardlink target {:?} is below a non-directory of this layer",
                        show(target)
                    )));
                }
            }
        }
        let here = if here_dir { self.paths.get(target).cloned() } else { None };
        let st = match here {
            Some(St::Dir(_)) => {
                return Err(bad(format!("hardlink to a directory {:?}", show(target))));
            }
            Some(St::Whiteout) => {
                return Err(bad(format!("hardlink to {:?}, which this layer deletes", show(target))));
            }
            Some(st) => st,
            None => self.copy_up(target, rel, lower)?,
        };
        self.clear(rel);
        self.add(rel, Kind::HardLink(target), &Meta::default_dir(ts(0, 0)), &mut std::io::empty())?;
        self.paths.insert(rel.to_vec(), st);
        Ok(())
    }

    /// `TreeWriter::copy_up`: the lower file at `target` into this layer.
    fn copy_up(&mut self, target: &[u8], rel: &[u8], lower: &mut Lower) -> Result<St> {
        let tp = split_last(target).0;
        let (f, meta) = lower_link_target(target, rel, hidden_below(&self.opaque, tp), lower)?;
        let st = f.stat;
        let ft = FileType::from_raw_mode(st.st_mode);
        self.dir(tp, lower, meta.mtime)?;
        let state = match ft {
            FileType::RegularFile => {
                let src = lower.reopen(&f, target)?;
                let meta = Meta { xattrs: read_xattrs(&src, target)?, ..meta };
                let mut r = std::fs::File::from(src);
                self.add(target, Kind::File { size: st.st_size as u64 }, &meta, &mut r)?;
                St::Other
            }
            FileType::Symlink => {
                let t = lower.readlink(&f, target)?;
                self.add(target, Kind::Symlink(&t), &meta, &mut std::io::empty())?;
                St::Symlink
            }
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                self.special(target, ft, st.st_rdev, &meta)?;
                St::Other
            }
            _ => {
                return Err(Error::bad_image(
                    format!("layer entry {:?}", show(rel)),
                    format!("hardlink to {:?}, which is not a file in the layers below", show(target)),
                ));
            }
        };
        log::debug!("hardlink {:?}: copied {:?} up from the lower layers", show(rel), show(target));
        self.paths.insert(target.to_vec(), state.clone());
        Ok(state)
    }
}

impl Sink for ErofsSink {
    fn entry<R: Read>(&mut self, p: Parsed, data: &mut tar::Entry<R>, lower: &mut Lower) -> Result<()> {
        let Parsed { rel, meta, op } = p;
        let parent_rel = split_last(&rel).0;
        match op {
            Op::Skip => return Ok(()),
            Op::Opaque => {
                // Below a non-directory of this layer, there is nothing to hide.
                if self.dir_opt(parent_rel, lower, meta.mtime)?.is_some() {
                    self.make_opaque(parent_rel)?;
                }
                return Ok(());
            }
            Op::Whiteout(name) => {
                if self.dir_opt(parent_rel, lower, meta.mtime)?.is_none() {
                    return Ok(()); // below a non-directory of this layer: moot
                }
                let path = join(parent_rel, &name);
                return match self.paths.get(&path) {
                    // This layer has it: the whiteout is for the lower layers only.
                    Some(St::Dir(_)) => self.make_opaque(&path),
                    Some(_) => Ok(()),
                    None => {
                        // Mode 0 and root's, as mknod makes it in the tree;
                        // the entry's mtime rather than the clock's.
                        let m = Meta { mode: 0, uid: 0, gid: 0, mtime: meta.mtime, xattrs: Vec::new() };
                        self.special(&path, FileType::CharacterDevice, 0, &m)
                    }
                };
            }
            Op::Root => {
                self.root_listed = true;
                let Some(St::Dir(old)) = self.paths.get(&rel[..]) else { unreachable!("the root is a directory") };
                let m = merge(old, &meta);
                return self.add_dir(&rel, m);
            }
            _ => {}
        }
        self.dir(parent_rel, lower, meta.mtime)?;
        match op {
            Op::Dir => match self.paths.get(&rel).cloned() {
                Some(St::Dir(old)) => self.add_dir(&rel, merge(&old, &meta)),
                Some(other) => {
                    self.clear(&rel);
                    if matches!(other, St::Whiteout) {
                        self.add_dir(&rel, with_opaque(&meta))?;
                        self.opaque.insert(rel.clone());
                        Ok(())
                    } else {
                        self.add_dir(&rel, meta)
                    }
                }
                None => self.add_dir(&rel, meta),
            },
            Op::File => {
                self.clear(&rel);
                let size = data.size();
                self.add(&rel, Kind::File { size }, &meta, data)?;
                self.paths.insert(rel, St::Other);
                Ok(())
            }
            Op::Symlink(target) => {
                self.clear(&rel);
                self.add(&rel, Kind::Symlink(&target), &meta, &mut std::io::empty())?;
                self.paths.insert(rel, St::Symlink);
                Ok(())
            }
            Op::HardLink(target) => self.hardlink(&rel, &target, lower),
            Op::Special(ft, dev) => self.special(&rel, ft, dev, &meta),
            Op::Skip | Op::Opaque | Op::Whiteout(_) | Op::Root => unreachable!("handled above"),
        }
    }

    /// An unlisted root gets the newest mtime, as the tree path's does.
    fn end(&mut self, c: &Counters) -> Result<()> {
        if !self.root_listed {
            let Some(St::Dir(m)) = self.paths.get(&[][..]) else { unreachable!("the root is a directory") };
            let m = Meta { mtime: c.newest, ..m.clone() };
            self.add_dir(b"", m)?;
        }
        Ok(())
    }
}
