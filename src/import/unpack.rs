//! One layer blob, streamed: decompressed (gzip, zstd or none, told by
//! its first bytes), hashed twice on the way (the blob against the
//! manifest, the tar against the config's diff ID) and written as a
//! directory tree in overlayfs form, ready for `image::build_image`.
//!
//! OCI → overlay: `.wh.NAME` becomes a whiteout (char device 0/0 at NAME),
//! `.wh..wh..opq` the xattr trusted.overlay.opaque=y on its directory.
//! Modes (setuid, setgid, sticky included), owners, mtimes, xattrs from PAX
//! `SCHILY.xattr.*`, symlinks, hardlinks, devices and fifos are kept; names
//! are bytes, never decoded.
//!
//! Traversal defence: every path is cleaned first (a leading '/' is
//! dropped, `.` and empty components ignored, `..` refused), and every
//! file system call is relative to a directory fd obtained with
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_XDEV)` (or its fallback walk, `crate::kernel::beneath`) from the
//! tree's root fd, with the last component
//! created or opened with O_NOFOLLOW / AT_SYMLINK_NOFOLLOW. An entry below
//! a symlink (made by this layer or a lower one) is refused, so nothing is
//! ever written outside the tree, whatever the tar says.
//!
//! Semantics taken from the OCI image spec and from what containerd does
//! when it applies a layer on the mounted lower chain:
//! - A whiteout only hides lower content: if this layer has the path
//!   already, a non-directory stays as is and a directory becomes opaque;
//!   an entry arriving after a whiteout of its path replaces it (a
//!   directory doing so is opaque, since the lower one was deleted).
//! - A parent directory the tar does not list is created with the
//!   metadata the lower layers have for it (else 0755 root:root), as an
//!   overlay copy-up would.
//! - A hardlink whose target is not in this layer's tar links to a copy of
//!   the lower file made at the target's path in this layer (again what a
//!   copy-up does), so both names are one inode in the merged view.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use rustix::io::Errno;
use sha2::{Digest as _, Sha256};

use super::lower::{Found, Lower};
use crate::kernel::beneath::Mounts;
use crate::error::{Error, Result, StoreError};
use crate::store::ids::Digest;

pub(super) const OPAQUE_XATTR: &str = "trusted.overlay.opaque";
const WH: &[u8] = b".wh.";
const WH_OPQ: &[u8] = b".wh..wh..opq";
const BLOCK: usize = 4096;
const CHUNK: usize = 1 << 20;

// ---------------------------------------------------------------- streams

/// A reader that hashes and counts what passes through it.
pub struct HashRead<'a, R> {
    inner: R,
    /// None: count only (the bytes are hashed elsewhere already).
    h: Option<Sha256>,
    pub n: u64,
    tick: Option<&'a dyn Fn(u64)>,
}

impl<'a, R: Read> HashRead<'a, R> {
    pub fn new(inner: R, tick: Option<&'a dyn Fn(u64)>) -> Self {
        HashRead { inner, h: Some(Sha256::new()), n: 0, tick }
    }
    fn counting(inner: R) -> Self {
        HashRead { inner, h: None, n: 0, tick: None }
    }
    /// Read what is left (so the digest covers the whole stream) and give
    /// the digest (None when counting only).
    pub fn finish(mut self) -> io::Result<(Option<Digest>, u64)> {
        io::copy(&mut self, &mut io::sink())?;
        Ok((self.h.map(|h| Digest::from_bytes(h.finalize().into())), self.n))
    }
}

impl<R: Read> Read for HashRead<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = &mut self.h {
            h.update(&buf[..n]);
        }
        self.n += n as u64;
        if let Some(t) = self.tick {
            t(n as u64);
        }
        Ok(n)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    pub fn sniff(head: &[u8]) -> Compression {
        if head.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
            || (head.len() >= 4 && head[0] & 0xf0 == 0x50 && head[1..4] == [0x2a, 0x4d, 0x18])
        {
            // A zstd frame, or a skippable frame (zstd:chunked starts some).
            Compression::Zstd
        } else {
            Compression::None
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Compression::None => "uncompressed",
            Compression::Gzip => "gzip",
            Compression::Zstd => "zstd",
        }
    }
}

/// The decompressed stream.
enum Decoder<R: BufRead> {
    Plain(R),
    /// Concatenated gzip members (pigz, some registries) are one stream.
    Gzip(flate2::bufread::MultiGzDecoder<R>),
    Zstd(Box<ZstdFrames<R>>),
}

impl<R: BufRead> Read for Decoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
        }
    }
}

/// zstd decoding with `ruzstd`, the pure-Rust decoder, rather than the
/// `zstd` crate's bindings to libzstd: the blob is not yet verified while
/// it is decoded (its digest is known only at its end), and a decoder
/// written in safe Rust is the better thing to expose to untrusted input;
/// it needs no C toolchain; decoding is all we need; and its speed is far
/// from being what limits an import (mkfs is). It decodes one frame per
/// instance, so this reads frame after frame and skips skippable frames,
/// as libzstd's streaming decoder does (zstd:chunked layers have both).
/// Window sizes above ruzstd's default limit (128 MiB, libzstd's default
/// too) are refused.
struct ZstdFrames<R: BufRead> {
    src: R,
    dec: ruzstd::decoding::FrameDecoder,
    in_frame: bool,
}

impl<R: BufRead> ZstdFrames<R> {
    fn new(src: R) -> Self {
        ZstdFrames { src, dec: ruzstd::decoding::FrameDecoder::new(), in_frame: false }
    }
}

fn zerr(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {e}"))
}

impl<R: BufRead> Read for ZstdFrames<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                if self.src.fill_buf()?.is_empty() {
                    return Ok(0);
                }
                match self.dec.init(&mut self.src) {
                    Ok(()) => self.in_frame = true,
                    Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame { length, .. })) => {
                        let skipped = io::copy(&mut (&mut self.src).take(u64::from(length)), &mut io::sink())?;
                        if skipped != u64::from(length) {
                            return Err(zerr("truncated skippable frame"));
                        }
                        continue;
                    }
                    Err(e) => return Err(zerr(e)),
                }
            }
            if self.dec.can_collect() == 0 && !self.dec.is_finished() {
                self.dec
                    .decode_blocks(&mut self.src, ruzstd::decoding::BlockDecodingStrategy::UptoBytes(CHUNK))
                    .map_err(zerr)?;
            }
            let n = self.dec.read(buf)?;
            if n > 0 {
                return Ok(n);
            }
            if self.dec.is_finished() && self.dec.can_collect() == 0 {
                self.in_frame = false;
            }
        }
    }
}

/// A reader of `r` decompressed (gzip, zstd or none, by its first bytes).
pub fn decompressed<'a, R: BufRead + Send + 'a>(mut r: R) -> io::Result<(Box<dyn Read + Send + 'a>, Compression)> {
    let c = Compression::sniff(r.fill_buf()?);
    let d: Box<dyn Read + Send + 'a> = match c {
        Compression::None => Box::new(r),
        Compression::Gzip => Box::new(flate2::bufread::MultiGzDecoder::new(r)),
        Compression::Zstd => Box::new(ZstdFrames::new(r)),
    };
    Ok((d, c))
}

// ---------------------------------------------------------------- layer

pub struct Expect {
    /// The blob's digest and size, when the source states them.
    pub blob: Option<Digest>,
    pub blob_size: Option<u64>,
    pub diff_id: Digest,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub blob_bytes: u64,
    pub tar_bytes: u64,
    pub entries: u64,
    pub compression: Option<&'static str>,
    pub lower_used: bool,
    pub ignored_xattrs: u64,
}

/// Stream `raw` (the blob) into the directory `tree` (existing, empty),
/// checking both digests. On any error the tree is left for the caller's
/// guard to remove.
pub fn unpack_layer(raw: impl Read, tree: &Path, lower: &mut Lower, expect: &Expect, tick: &dyn Fn(u64)) -> Result<Stats> {
    let mut w = TreeWriter::new(tree)?;
    stream_layer(raw, tree, &mut w, lower, expect, tick)
}

/// What a layer's entries go to: a directory tree (`TreeWriter`) or an
/// erofs image (`super::stream_erofs`). Both get the same parsed
/// entries, so the checks and refusals of `parse_entry` are the same.
pub(super) trait Sink {
    fn entry<R: Read>(&mut self, p: Parsed, data: &mut tar::Entry<R>, lower: &mut Lower) -> Result<()>;
    /// After the last entry, before the digests are checked.
    fn end(&mut self, c: &Counters) -> Result<()>;
}

/// Stream `raw` (the blob) into `sink`, checking both digests (`what`
/// names the destination in errors). On any error the sink's output is
/// left for the caller's guard to remove; a sink must not make its
/// output final before this returns Ok.
pub(super) fn stream_layer<S: Sink>(raw: impl Read, what: &Path, sink: &mut S, lower: &mut Lower, expect: &Expect, tick: &dyn Fn(u64)) -> Result<Stats> {
    let tree = what;
    let mut stats = Stats::default();
    let mut blob = HashRead::new(raw, Some(tick));
    let result = (|| -> Result<(Option<Digest>, u64)> {
        let mut buf = BufReader::with_capacity(CHUNK, &mut blob);
        let head = buf.fill_buf().map_err(|e| Error::io("read layer blob", tree, &e))?;
        let c = Compression::sniff(head);
        stats.compression = Some(c.as_str());
        let dec = match c {
            Compression::None => Decoder::Plain(buf),
            Compression::Gzip => Decoder::Gzip(flate2::bufread::MultiGzDecoder::new(buf)),
            Compression::Zstd => Decoder::Zstd(Box::new(ZstdFrames::new(buf))),
        };
        // An uncompressed blob is the tar itself: its digest is hashed once.
        let mut diff = if c == Compression::None { HashRead::counting(dec) } else { HashRead::new(dec, None) };
        let mut c = Counters::default();
        {
            let mut ar = tar::Archive::new(&mut diff);
            let bad = |e: io::Error| Error::bad_image_io("layer tar", &e);
            for ent in ar.entries().map_err(bad)? {
                if crate::interrupt::interrupted() {
                    return Err(Error::Interrupted);
                }
                let mut ent = ent.map_err(bad)?;
                let p = parse_entry(&mut ent, &mut c)?;
                sink.entry(p, &mut ent, lower)?;
            }
        }
        sink.end(&c)?;
        stats.entries = c.entries;
        stats.ignored_xattrs = c.ignored_xattrs;
        diff.finish().map_err(|e| Error::bad_image_io("layer tar", &e))
    })();
    stats.lower_used = lower.was_mounted();
    if let Err(Error::Interrupted) = result {
        return Err(Error::Interrupted);
    }
    // Otherwise hash the rest of the blob, whatever happened: a decoding
    // error on a blob that does not match its digest is reported as the
    // mismatch it is.
    let blob_end = blob.finish();
    let blob_end = blob_end.map(|(d, n)| (d.expect("blob hashed"), n));
    let blob_check = |got: &(Digest, u64)| -> Result<()> {
        if let Some(want) = expect.blob
            && got.0 != want
        {
            return Err(Error::mismatch(format!("blob {want}"), "digest", "", format!("the blob read has {} ({} bytes)", got.0, got.1)));
        }
        if let Some(s) = expect.blob_size
            && s != got.1
        {
            return Err(Error::mismatch("", "blob size", format!("the manifest says {s} bytes"), format!("the blob has {}", got.1)));
        }
        Ok(())
    };
    let (diff_got, tar_bytes) = match result {
        Ok(v) => v,
        Err(e) => {
            if let Ok(got) = &blob_end {
                // The mismatch is the cause; the decoding error it led to follows.
                blob_check(got).map_err(|m| match m {
                    Error::Store(StoreError::Mismatch { what, which, want, got }) => {
                        Error::Store(StoreError::Mismatch { what, which, want, got: format!("{got}; {e}") })
                    }
                    m => m,
                })?;
            }
            return Err(e);
        }
    };
    let got = blob_end.map_err(|e| Error::bad_image_io("read layer blob", &e))?;
    blob_check(&got)?;
    let diff_got = diff_got.unwrap_or(got.0);
    if diff_got != expect.diff_id {
        return Err(Error::mismatch(
            "",
            "diff ID",
            format!("the config says {}", expect.diff_id),
            format!("the uncompressed layer has {diff_got}"),
        ));
    }
    stats.blob_bytes = got.1;
    stats.tar_bytes = tar_bytes;
    Ok(stats)
}

// ---------------------------------------------------------------- paths

/// The cleaned relative path of a tar entry: components joined by '/',
/// empty for the root. A leading '/' is dropped (as tar and containerd
/// do); `..` is refused.
pub fn clean_path(raw: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let mut out: Vec<u8> = Vec::with_capacity(raw.len());
    for c in raw.split(|&b| b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err(format!("{:?}: '..' in a layer path", String::from_utf8_lossy(raw))),
            c => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(c);
            }
        }
    }
    Ok(out)
}

pub(super) fn split_last(rel: &[u8]) -> (&[u8], &[u8]) {
    match rel.iter().rposition(|&b| b == b'/') {
        Some(i) => (&rel[..i], &rel[i + 1..]),
        None => (&[], rel),
    }
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

pub(super) fn show(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The xattrs an OCI layer carries that we apply; the same set
/// `image` writes into its diff tar. Others (trusted.* — never from
/// an image —, security.selinux, ...) are host policy and dropped.
fn wanted_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name == b"security.capability"
}

// ---------------------------------------------------------------- metadata

#[derive(Clone, Debug)]
pub(super) struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: Timespec,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Meta {
    pub(super) fn default_dir(mtime: Timespec) -> Meta {
        Meta { mode: 0o755, uid: 0, gid: 0, mtime, xattrs: Vec::new() }
    }
}

pub(super) fn ts(sec: i64, nsec: i64) -> Timespec {
    Timespec { tv_sec: sec, tv_nsec: nsec as _ }
}

/// PAX "mtime": decimal seconds with an optional fraction.
fn pax_time(v: &[u8]) -> Option<Timespec> {
    let s = std::str::from_utf8(v).ok()?;
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    let sec: i64 = sec.parse().ok()?;
    let mut nsec: i64 = 0;
    for (i, c) in frac.bytes().take(9).enumerate() {
        if !c.is_ascii_digit() {
            return None;
        }
        nsec += i64::from(c - b'0') * 10i64.pow(8 - i as u32);
    }
    // "-1.5" means -1.5 s: one second and a half before the epoch.
    if (sec < 0 || s.starts_with('-')) && nsec > 0 {
        return Some(ts(sec - 1, 1_000_000_000 - nsec));
    }
    Some(ts(sec, nsec))
}

// ---------------------------------------------------------------- entries

/// Counts over a layer's entries.
#[derive(Default)]
pub(super) struct Counters {
    pub entries: u64,
    pub ignored_xattrs: u64,
    /// The newest mtime: the root's when the tar does not list it.
    pub newest: Timespec,
}

/// One tar entry, checked and in overlay terms.
pub(super) struct Parsed {
    /// Cleaned (`clean_path`): never absolute, never with `..`.
    pub rel: Vec<u8>,
    pub meta: Meta,
    pub op: Op,
}

pub(super) enum Op {
    /// Nothing to do (a global PAX header, aufs bookkeeping).
    Skip,
    /// `.wh..wh..opq`: the parent of `rel` becomes opaque.
    Opaque,
    /// `.wh.NAME`: NAME in the parent of `rel` is deleted from below.
    Whiteout(Vec<u8>),
    /// A listed root (always a directory).
    Root,
    Dir,
    /// A regular file; its content is the entry's data.
    File,
    Symlink(Vec<u8>),
    /// The cleaned target path.
    HardLink(Vec<u8>),
    Special(FileType, u64),
}

/// `parent/name` ("name" at the root).
pub(super) fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = parent.to_vec();
    if !p.is_empty() {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

/// Checks one entry and says what it is; refuses bad paths, names and
/// types. The same for every sink.
pub(super) fn parse_entry<R: Read>(ent: &mut tar::Entry<R>, c: &mut Counters) -> Result<Parsed> {
    use tar::EntryType as T;
    c.entries += 1;
    let kind = ent.header().entry_type();
    if matches!(kind, T::XGlobalHeader) {
        return Ok(Parsed { rel: Vec::new(), meta: Meta::default_dir(ts(0, 0)), op: Op::Skip });
    }
    let raw = ent.path_bytes().into_owned();
    let rel = clean_path(&raw).map_err(|m| Error::refused("layer entry", m))?;
    let meta = meta_of(c, ent, &rel)?;
    let name = split_last(&rel).1;
    let op = if name == WH_OPQ {
        Op::Opaque
    } else if let Some(target) = name.strip_prefix(WH) {
        if target.starts_with(WH) {
            Op::Skip // aufs bookkeeping (.wh..wh.plnk, ...)
        } else if target.is_empty() || target == b"." || target == b".." {
            return Err(Error::refused(format!("layer entry {:?}", show(&raw)), "bad whiteout name"));
        } else {
            Op::Whiteout(target.to_vec())
        }
    } else if rel.is_empty() {
        if kind != T::Directory {
            return Err(Error::refused(format!("layer entry {:?}", show(&raw)), "the root must be a directory"));
        }
        Op::Root
    } else {
        match kind {
            T::Directory => Op::Dir,
            T::Regular | T::Continuous | T::GNUSparse => Op::File,
            T::Symlink => Op::Symlink(
                ent.link_name_bytes()
                    .map(|c| c.into_owned())
                    .filter(|t| !t.is_empty())
                    .ok_or_else(|| Error::bad_image(format!("layer entry {:?}", show(&rel)), "symlink without a target"))?,
            ),
            T::Link => {
                let target = ent
                    .link_name_bytes()
                    .map(|c| c.into_owned())
                    .ok_or_else(|| Error::bad_image(format!("layer entry {:?}", show(&rel)), "hardlink without a target"))?;
                Op::HardLink(clean_path(&target).map_err(|m| Error::refused(format!("hardlink {:?}", show(&rel)), format!("target {m}")))?)
            }
            T::Char | T::Block | T::Fifo => {
                let h = ent.header();
                let dev = if kind == T::Fifo {
                    0
                } else {
                    let bad = || Error::bad_image(format!("layer entry {:?}", show(&rel)), "bad device number");
                    let ma = h.device_major().map_err(|_| bad())?.unwrap_or(0);
                    let mi = h.device_minor().map_err(|_| bad())?.unwrap_or(0);
                    rustix::fs::makedev(ma, mi)
                };
                let ft = match kind {
                    T::Char => FileType::CharacterDevice,
                    T::Block => FileType::BlockDevice,
                    _ => FileType::Fifo,
                };
                Op::Special(ft, dev)
            }
            other => {
                return Err(Error::bad_image(format!("layer entry {:?}", show(&rel)), format!("unsupported tar entry type {:?}", other.as_byte() as char)));
            }
        }
    };
    Ok(Parsed { rel, meta, op })
}

fn meta_of<R: Read>(c: &mut Counters, ent: &mut tar::Entry<R>, rel: &[u8]) -> Result<Meta> {
    let h = ent.header();
    let bad = |what: &str| Error::bad_image(format!("layer entry {:?}", show(rel)), format!("bad {what} in tar header"));
    let mode = h.mode().map_err(|_| bad("mode"))? & 0o7777;
    let uid = u32::try_from(h.uid().map_err(|_| bad("uid"))?).map_err(|_| bad("uid"))?;
    let gid = u32::try_from(h.gid().map_err(|_| bad("gid"))?).map_err(|_| bad("gid"))?;
    let mut mtime = ts(h.mtime().map_err(|_| bad("mtime"))? as i64, 0);
    let mut xattrs = Vec::new();
    if let Some(pax) = ent.pax_extensions().map_err(|e| Error::bad_image(format!("layer entry {:?}", show(rel)), format!("PAX header: {e}")))? {
        for ext in pax {
            let ext = ext.map_err(|e| Error::bad_image(format!("layer entry {:?}", show(rel)), format!("PAX header: {e}")))?;
            let k = ext.key_bytes();
            if k == b"mtime" {
                mtime = pax_time(ext.value_bytes()).ok_or_else(|| bad("PAX mtime"))?;
            } else if let Some(name) = k.strip_prefix(b"SCHILY.xattr.") {
                if wanted_xattr(name) {
                    xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                } else {
                    log::debug!("layer entry {:?}: xattr {} ignored", show(rel), show(name));
                    c.ignored_xattrs += 1;
                }
            }
        }
    }
    if (mtime.tv_sec, mtime.tv_nsec) > (c.newest.tv_sec, c.newest.tv_nsec) {
        c.newest = mtime;
    }
    Ok(Meta { mode, uid, gid, mtime, xattrs })
}


/// Is `rel` hidden from the lower layers by an opaque directory (or a
/// whiteout-then-recreate) of this layer at or above it?
pub(super) fn hidden_below(opaque: &HashSet<Vec<u8>>, rel: &[u8]) -> bool {
    if opaque.contains(&[][..]) {
        return true;
    }
    rel.iter()
        .enumerate()
        .filter(|(_, b)| **b == b'/')
        .map(|(i, _)| &rel[..i])
        .chain(std::iter::once(rel))
        .any(|p| opaque.contains(p))
}

/// The lower file a hard link `rel` of this layer names as `target` when
/// the layer itself does not hold it (unless `hidden`: this layer hides
/// the layers below there), and the metadata its copy gets. Both import
/// paths copy it up, as overlayfs would, so that the link has a file.
pub(super) fn lower_link_target(target: &[u8], rel: &[u8], hidden: bool, lower: &mut Lower) -> Result<(Found, Meta)> {
    let found = if hidden { None } else { lower.lookup(target)? };
    let Some(f) = found else {
        return Err(Error::bad_image(
            format!("layer entry {:?}", show(rel)),
            format!("hardlink target {:?} is neither in this layer nor in the layers below", show(target)),
        ));
    };
    let meta = Meta {
        mode: f.stat.st_mode & 0o7777,
        uid: f.stat.st_uid,
        gid: f.stat.st_gid,
        mtime: ts(f.stat.st_mtime, f.stat.st_mtime_nsec as i64),
        xattrs: Vec::new(),
    };
    Ok((f, meta))
}

/// The metadata an unlisted parent directory `rel` gets: the lower
/// layers' (unless `hidden`: this layer hides them above it), else 0755
/// root with mtime `hint`, as an overlay copy-up would.
pub(super) fn lower_dir_meta(rel: &[u8], hidden: bool, lower: &mut Lower, hint: Timespec) -> Result<Meta> {
    if hidden {
        return Ok(Meta::default_dir(hint));
    }
    let Some(f) = lower.lookup(rel)? else { return Ok(Meta::default_dir(hint)) };
    match FileType::from_raw_mode(f.stat.st_mode) {
        FileType::Directory => {
            let fd = lower.reopen(&f, rel)?;
            Ok(Meta {
                mode: f.stat.st_mode & 0o7777,
                uid: f.stat.st_uid,
                gid: f.stat.st_gid,
                mtime: ts(f.stat.st_mtime, f.stat.st_mtime_nsec as i64),
                xattrs: read_xattrs(&fd, rel)?,
            })
        }
        FileType::Symlink => Err(Error::refused(format!("layer entry below {:?}", show(rel)), "it is a symlink in the layers below")),
        // A file below, a directory from this layer on.
        _ => Ok(Meta::default_dir(hint)),
    }
}

// ---------------------------------------------------------------- writer

struct TreeWriter {
    root: OwnedFd,
    root_path: PathBuf,
    /// Directory mtimes, set at the end (children change them).
    dir_times: HashMap<Vec<u8>, Timespec>,
    /// Directories this layer made opaque (or re-created after a whiteout):
    /// the lower layers' content below them is hidden.
    opaque: HashSet<Vec<u8>>,
    /// Last parent directory used: entries of one directory come together.
    cache: Option<(Vec<u8>, OwnedFd)>,
    buf: Vec<u8>,
    root_listed: bool,
}

fn errp(what: &str, rel: &[u8], e: Errno) -> Error {
    Error::sys(format!("layer entry {:?}: {what}", show(rel)), show(rel), e)
}

impl TreeWriter {
    fn new(tree: &Path) -> Result<TreeWriter> {
        let root = rustix::fs::open(tree, OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC | OFlags::NOFOLLOW, Mode::empty())
            .map_err(|e| Error::sys("open staging tree", tree, e))?;
        // What a snapshotter gives a layer whose tar has no "./" entry.
        rustix::fs::fchown(&root, Some(rustix::fs::Uid::ROOT), Some(rustix::fs::Gid::ROOT))
            .and_then(|_| rustix::fs::fchmod(&root, Mode::from_raw_mode(0o755)))
            .map_err(|e| Error::sys("set up staging tree", tree, e))?;
        Ok(TreeWriter {
            root,
            root_path: tree.to_path_buf(),
            dir_times: HashMap::new(),
            opaque: HashSet::new(),
            cache: None,
            buf: vec![0u8; CHUNK],
            root_listed: false,
        })
    }

    fn dispatch<R: Read>(&mut self, p: Parsed, ent: &mut tar::Entry<R>, lower: &mut Lower) -> Result<()> {
        let Parsed { rel, meta, op } = p;
        let (parent_rel, name) = split_last(&rel);
        match op {
            Op::Skip => return Ok(()),
            Op::Opaque => {
                // Below a non-directory of this layer, there is nothing to hide.
                if let Some(fd) = self.dir_opt(parent_rel, lower, meta.mtime)? {
                    self.make_opaque(&fd, parent_rel)?;
                }
                return Ok(());
            }
            Op::Whiteout(target) => {
                let Some(fd) = self.dir_opt(parent_rel, lower, meta.mtime)? else {
                    return Ok(()); // below a non-directory of this layer: moot
                };
                let path = join(parent_rel, &target);
                return self.whiteout(&fd, &target, &path);
            }
            Op::Root => {
                self.root_listed = true;
                let fd = rustix::fs::openat(&self.root, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
                    .map_err(|e| errp("open", &rel, e))?;
                self.apply_fd(&fd, &rel, &meta, true)?;
                self.dir_times.insert(rel, meta.mtime);
                return Ok(());
            }
            _ => {}
        }
        let parent = self.dir(parent_rel, lower, meta.mtime)?;
        match op {
            Op::Dir => self.directory(&parent, name, &rel, &meta),
            Op::File => self.file(&parent, name, &rel, &meta, ent),
            Op::Symlink(target) => self.symlink(&parent, name, &rel, &target, &meta),
            Op::HardLink(target) => self.hardlink(&parent, name, &rel, &target, lower),
            Op::Special(ft, dev) => self.special(&parent, name, &rel, ft, dev, &meta),
            Op::Skip | Op::Opaque | Op::Whiteout(_) | Op::Root => unreachable!("handled above"),
        }
    }

    // ------------------------------------------------------------ dirs

    /// An fd for directory `rel` of the tree, creating what is missing the
    /// way an overlay copy-up would (lower metadata, else 0755 root).
    fn dir(&mut self, rel: &[u8], lower: &mut Lower, hint: Timespec) -> Result<OwnedFd> {
        self.dir_opt(rel, lower, hint)?.ok_or_else(|| {
            Error::refused(format!("layer entry below {:?}", show(rel)), "a part of it is not a directory in this layer")
        })
    }

    /// The same, None if a component is a non-directory of this layer.
    fn dir_opt(&mut self, rel: &[u8], lower: &mut Lower, hint: Timespec) -> Result<Option<OwnedFd>> {
        if let Some((p, fd)) = &self.cache
            && p == rel
        {
            return fd.try_clone().map(Some).map_err(|e| Error::io("dup", &self.root_path, &e));
        }
        let fd = if rel.is_empty() {
            self.root.try_clone().map_err(|e| Error::io("dup", &self.root_path, &e))?
        } else {
            match beneath(&self.root, os(rel), OFlags::PATH | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC) {
                Ok(fd) => fd,
                Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) | Err(Errno::XDEV) => match self.make_dirs(rel, lower, hint)? {
                    Some(fd) => fd,
                    None => return Ok(None),
                },
                Err(e) => return Err(errp("open parent directory", rel, e)),
            }
        };
        let keep = fd.try_clone().map_err(|e| Error::io("dup", &self.root_path, &e))?;
        self.cache = Some((rel.to_vec(), keep));
        Ok(Some(fd))
    }

    /// What directory `rel` of the tree is, without creating anything.
    fn probe_dir(&self, rel: &[u8]) -> Result<Probe> {
        let fd = if rel.is_empty() {
            return Ok(Probe::Dir(self.root.try_clone().map_err(|e| Error::io("dup", &self.root_path, &e))?));
        } else {
            beneath(&self.root, os(rel), OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC)
        };
        match fd {
            Ok(fd) => {
                let st = rustix::fs::fstat(&fd).map_err(|e| errp("stat", rel, e))?;
                Ok(match FileType::from_raw_mode(st.st_mode) {
                    FileType::Directory => Probe::Dir(fd),
                    FileType::Symlink => Probe::Symlink,
                    _ => Probe::NotDir,
                })
            }
            Err(Errno::NOENT) => Ok(Probe::Missing),
            // RESOLVE_NO_SYMLINKS met a symlink on the way.
            Err(Errno::LOOP) | Err(Errno::XDEV) => Ok(Probe::Symlink),
            Err(Errno::NOTDIR) => Ok(Probe::NotDir),
            Err(e) => Err(errp("open directory", rel, e)),
        }
    }

    /// Walk `rel` component by component, creating missing directories.
    /// None if a component is a non-directory of this layer; a symlink on
    /// the way is refused.
    fn make_dirs(&mut self, rel: &[u8], lower: &mut Lower, hint: Timespec) -> Result<Option<OwnedFd>> {
        let mut cur = self.root.try_clone().map_err(|e| Error::io("dup", &self.root_path, &e))?;
        let mut prefix: Vec<u8> = Vec::new();
        for comp in rel.split(|&b| b == b'/') {
            if !prefix.is_empty() {
                prefix.push(b'/');
            }
            prefix.extend_from_slice(comp);
            match rustix::fs::statat(&cur, os(comp), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => {
                    let ft = FileType::from_raw_mode(st.st_mode);
                    if ft == FileType::Directory {
                        cur = open_dir_at(&cur, comp, &prefix, true)?;
                        continue;
                    }
                    if is_whiteout(&st) {
                        // Deleted from below by this layer, now a new directory.
                        rustix::fs::unlinkat(&cur, os(comp), AtFlags::empty()).map_err(|e| errp("replace whiteout", &prefix, e))?;
                        cur = self.create_dir(&cur, comp, &prefix, &Meta::default_dir(hint), true)?;
                        continue;
                    }
                    if ft == FileType::Symlink {
                        return Err(Error::refused(format!("layer entry below {:?}", show(&prefix)), "it is a symlink in this layer"));
                    }
                    return Ok(None);
                }
                Err(Errno::NOENT) => {
                    let meta = self.lower_dir_meta(&prefix, lower, hint)?;
                    cur = self.create_dir(&cur, comp, &prefix, &meta, false)?;
                }
                Err(e) => return Err(errp("stat", &prefix, e)),
            }
        }
        Ok(Some(cur))
    }

    fn hidden_below(&self, rel: &[u8]) -> bool {
        hidden_below(&self.opaque, rel)
    }

    fn lower_dir_meta(&mut self, rel: &[u8], lower: &mut Lower, hint: Timespec) -> Result<Meta> {
        lower_dir_meta(rel, self.hidden_below(split_last(rel).0), lower, hint)
    }

    fn create_dir(&mut self, parent: &OwnedFd, name: &[u8], rel: &[u8], meta: &Meta, opaque: bool) -> Result<OwnedFd> {
        rustix::fs::mkdirat(parent, os(name), Mode::from_raw_mode(0o700)).map_err(|e| errp("mkdir", rel, e))?;
        let fd = open_dir_at(parent, name, rel, false)?;
        self.apply_fd(&fd, rel, meta, true)?;
        if opaque {
            self.make_opaque(&fd, rel)?;
        }
        self.dir_times.insert(rel.to_vec(), meta.mtime);
        Ok(fd)
    }

    fn make_opaque(&mut self, fd: &OwnedFd, rel: &[u8]) -> Result<()> {
        let fd = reopen_rd(fd, rel)?;
        rustix::fs::fsetxattr(&fd, OPAQUE_XATTR, b"y", XattrFlags::empty()).map_err(|e| {
            errp(&format!("set {OPAQUE_XATTR} (the staging directory's filesystem must take trusted.* xattrs)"), rel, e)
        })?;
        self.opaque.insert(rel.to_vec());
        Ok(())
    }

    fn directory(&mut self, parent: &OwnedFd, name: &[u8], rel: &[u8], meta: &Meta) -> Result<()> {
        match rustix::fs::statat(parent, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                let fd = open_dir_at(parent, name, rel, false)?;
                self.apply_fd(&fd, rel, meta, true)?;
                self.dir_times.insert(rel.to_vec(), meta.mtime);
                Ok(())
            }
            Ok(st) => {
                let was_whiteout = is_whiteout(&st);
                rustix::fs::unlinkat(parent, os(name), AtFlags::empty()).map_err(|e| errp("replace", rel, e))?;
                self.create_dir(parent, name, rel, meta, was_whiteout).map(drop)
            }
            Err(Errno::NOENT) => {
                self.create_dir(parent, name, rel, meta, false).map(drop)
            }
            Err(e) => Err(errp("stat", rel, e)),
        }
    }

    // ------------------------------------------------------------ others

    /// Make room for a new non-directory at `name`. Returns whether a
    /// whiteout was there (the new entry then hides the lower one anyway).
    fn clear(&mut self, parent: &OwnedFd, name: &[u8], rel: &[u8]) -> Result<Option<rustix::fs::Stat>> {
        match rustix::fs::statat(parent, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                // A type change inside one layer: the directory goes, and
                // so does the parent cache if it pointed into it.
                self.cache = None;
                let p = self.root_path.join(os(rel));
                std::fs::remove_dir_all(&p).map_err(|e| Error::io(format!("layer entry {:?}: replace directory", show(rel)), &p, &e))?;
                Ok(Some(st))
            }
            Ok(st) => {
                rustix::fs::unlinkat(parent, os(name), AtFlags::empty()).map_err(|e| errp("replace", rel, e))?;
                Ok(Some(st))
            }
            Err(Errno::NOENT) => Ok(None),
            Err(e) => Err(errp("stat", rel, e)),
        }
    }

    fn whiteout(&mut self, parent: &OwnedFd, name: &[u8], rel: &[u8]) -> Result<()> {
        match rustix::fs::statat(parent, os(name), AtFlags::SYMLINK_NOFOLLOW) {
            // This layer has it: the whiteout is for the lower layers only.
            Ok(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                let fd = open_dir_at(parent, name, rel, false)?;
                self.make_opaque(&fd, rel)
            }
            Ok(_) => Ok(()),
            Err(Errno::NOENT) => {
                rustix::fs::mknodat(parent, os(name), FileType::CharacterDevice, Mode::empty(), 0).map_err(|e| errp("create whiteout", rel, e))
            }
            Err(e) => Err(errp("stat", rel, e)),
        }
    }

    fn file<R: Read>(&mut self, parent: &OwnedFd, name: &[u8], rel: &[u8], meta: &Meta, data: &mut R) -> Result<()> {
        self.clear(parent, name, rel)?;
        let fd = create_file(parent, name, rel)?;
        self.write_data(&fd, rel, data)?;
        self.apply_fd(&fd, rel, meta, false)?;
        rustix::fs::futimens(&fd, &Timestamps { last_access: meta.mtime, last_modification: meta.mtime })
            .map_err(|e| errp("set times", rel, e))
    }

    /// Copy the entry's data, leaving holes where whole blocks are zero
    /// (mkfs skips those anyway; this keeps staging small).
    fn write_data(&mut self, fd: &OwnedFd, rel: &[u8], data: &mut impl Read) -> Result<()> {
        let mut off: u64 = 0;
        loop {
            if crate::interrupt::interrupted() {
                return Err(Error::Interrupted);
            }
            let mut n = 0;
            while n < self.buf.len() {
                match data.read(&mut self.buf[n..]) {
                    Ok(0) => break,
                    Ok(k) => n += k,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(Error::bad_image(format!("layer entry {:?}", show(rel)), format!("read from layer: {e}"))),
                }
            }
            if n == 0 {
                break;
            }
            for (i, block) in self.buf[..n].chunks(BLOCK).enumerate() {
                if block.iter().all(|&b| b == 0) {
                    continue;
                }
                let mut at = off + (i * BLOCK) as u64;
                let mut rest = block;
                while !rest.is_empty() {
                    let w = rustix::io::pwrite(fd, rest, at).map_err(|e| errp("write", rel, e))?;
                    rest = &rest[w..];
                    at += w as u64;
                }
            }
            off += n as u64;
        }
        rustix::fs::ftruncate(fd, off).map_err(|e| errp("set size", rel, e))
    }

    fn symlink(&mut self, parent: &OwnedFd, name: &[u8], rel: &[u8], target: &[u8], meta: &Meta) -> Result<()> {
        self.clear(parent, name, rel)?;
        rustix::fs::symlinkat(os(target), parent, os(name)).map_err(|e| errp("create symlink", rel, e))?;
        self.apply_at(parent, name, rel, meta, true)
    }

    fn special(&mut self, parent: &OwnedFd, name: &[u8], rel: &[u8], ft: FileType, dev: u64, meta: &Meta) -> Result<()> {
        self.clear(parent, name, rel)?;
        rustix::fs::mknodat(parent, os(name), ft, Mode::from_raw_mode(0o600), dev).map_err(|e| errp("mknod", rel, e))?;
        self.apply_at(parent, name, rel, meta, false)
    }

    fn hardlink(&mut self, parent: &OwnedFd, name: &[u8], rel: &[u8], target: &[u8], lower: &mut Lower) -> Result<()> {
        if target == rel || target.is_empty() {
            return Err(Error::bad_image(format!("layer entry {:?}", show(rel)), "hardlink to itself or to the root"));
        }
        let (tp, tn) = split_last(target);
        let here = match self.probe_dir(tp)? {
            Probe::Dir(fd) => match rustix::fs::statat(&fd, os(tn), AtFlags::SYMLINK_NOFOLLOW) {
                Ok(st) => Some(st),
                Err(Errno::NOENT) => None,
                Err(e) => return Err(errp("stat hardlink target", target, e)),
            },
            Probe::Missing => None,
            Probe::Symlink => {
                return Err(Error::refused(format!("hardlink {:?}", show(rel)), format!("its target {:?} is below a symlink", show(target))));
            }
            Probe::NotDir => {
                return Err(Error::bad_image(format!("layer entry {:?}", show(rel)), format!("hardlink target {:?} is below a non-directory of this layer", show(target))));
            }
        };
        let target_st = match here {
            Some(st) if FileType::from_raw_mode(st.st_mode) == FileType::Directory => {
                return Err(Error::bad_image(format!("layer entry {:?}", show(rel)), format!("hardlink to a directory {:?}", show(target))));
            }
            Some(st) if is_whiteout(&st) => {
                return Err(Error::bad_image(format!("layer entry {:?}", show(rel)), format!("hardlink to {:?}, which this layer deletes", show(target))));
            }
            Some(st) => st,
            None => self.copy_up(target, rel, lower)?,
        };
        if let Ok(st) = rustix::fs::statat(parent, os(name), AtFlags::SYMLINK_NOFOLLOW)
            && st.st_dev == target_st.st_dev
            && st.st_ino == target_st.st_ino
        {
            return Ok(());
        }
        self.clear(parent, name, rel)?;
        let tdir = self.dir(tp, lower, ts(0, 0))?;
        // `parent` may have been the cache's fd; it stays valid either way.
        rustix::fs::linkat(&tdir, os(tn), parent, os(name), AtFlags::empty()).map_err(|e| errp("hardlink", rel, e))
    }

    /// A hardlink's target from the lower layers, copied into this layer at
    /// its own path (an overlay copy-up), so the link can point to it.
    fn copy_up(&mut self, target: &[u8], rel: &[u8], lower: &mut Lower) -> Result<rustix::fs::Stat> {
        let (tp, tn) = split_last(target);
        let (f, meta) = lower_link_target(target, rel, self.hidden_below(tp), lower)?;
        let st = f.stat;
        let ft = FileType::from_raw_mode(st.st_mode);
        let dir = self.dir(tp, lower, meta.mtime)?;
        match ft {
            FileType::RegularFile => {
                let src = lower.reopen(&f, target)?;
                let meta = Meta { xattrs: read_xattrs(&src, target)?, ..meta };
                let fd = create_file(&dir, tn, target)?;
                let mut r = std::fs::File::from(src);
                self.write_data(&fd, target, &mut r)?;
                self.apply_fd(&fd, target, &meta, false)?;
                rustix::fs::futimens(&fd, &Timestamps { last_access: meta.mtime, last_modification: meta.mtime })
                    .map_err(|e| errp("set times", target, e))?;
            }
            FileType::Symlink => {
                let t = lower.readlink(&f, target)?;
                rustix::fs::symlinkat(os(&t), &dir, os(tn)).map_err(|e| errp("copy symlink", target, e))?;
                self.apply_at(&dir, tn, target, &meta, true)?;
            }
            FileType::CharacterDevice | FileType::BlockDevice | FileType::Fifo => {
                rustix::fs::mknodat(&dir, os(tn), ft, Mode::from_raw_mode(0o600), st.st_rdev).map_err(|e| errp("copy device", target, e))?;
                self.apply_at(&dir, tn, target, &meta, false)?;
            }
            _ => {
                return Err(Error::bad_image(format!("layer entry {:?}", show(rel)), format!("hardlink to {:?}, which is not a file in the layers below", show(target))));
            }
        }
        log::debug!("hardlink {:?}: copied {:?} up from the lower layers", show(rel), show(target));
        rustix::fs::statat(&dir, os(tn), AtFlags::SYMLINK_NOFOLLOW).map_err(|e| errp("stat", target, e))
    }

    // ------------------------------------------------------------ metadata

    /// Owner, then mode (chown clears setuid/setgid), then xattrs
    /// (chown clears security.capability), on an open file or directory.
    fn apply_fd(&mut self, fd: &OwnedFd, rel: &[u8], meta: &Meta, _dir: bool) -> Result<()> {
        rustix::fs::fchown(fd, Some(rustix::fs::Uid::from_raw(meta.uid)), Some(rustix::fs::Gid::from_raw(meta.gid)))
            .map_err(|e| errp("chown", rel, e))?;
        rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode)).map_err(|e| errp("chmod", rel, e))?;
        for (k, v) in &meta.xattrs {
            rustix::fs::fsetxattr(fd, os(k), v, XattrFlags::empty()).map_err(|e| errp(&format!("set xattr {}", show(k)), rel, e))?;
        }
        Ok(())
    }

    /// The same for a symlink, device or fifo (which we cannot open),
    /// plus its times.
    fn apply_at(&mut self, parent: &OwnedFd, name: &[u8], rel: &[u8], meta: &Meta, symlink: bool) -> Result<()> {
        rustix::fs::chownat(
            parent,
            os(name),
            Some(rustix::fs::Uid::from_raw(meta.uid)),
            Some(rustix::fs::Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| errp("chown", rel, e))?;
        if !symlink {
            // Not a symlink (we just made it), so following is harmless.
            rustix::fs::chmodat(parent, os(name), Mode::from_raw_mode(meta.mode), AtFlags::empty()).map_err(|e| errp("chmod", rel, e))?;
        }
        if !meta.xattrs.is_empty() {
            // lsetxattr through the parent's fd: nothing to resolve but `name`.
            let mut p = format!("/proc/self/fd/{}/", parent.as_raw_fd()).into_bytes();
            p.extend_from_slice(name);
            for (k, v) in &meta.xattrs {
                rustix::fs::lsetxattr(os(&p), os(k), v, XattrFlags::empty())
                    .map_err(|e| errp(&format!("set xattr {}", show(k)), rel, e))?;
            }
        }
        rustix::fs::utimensat(
            parent,
            os(name),
            &Timestamps { last_access: meta.mtime, last_modification: meta.mtime },
            AtFlags::SYMLINK_NOFOLLOW,
        )
        .map_err(|e| errp("set times", rel, e))
    }

    /// Directory mtimes last: creating their children changed them.
    fn finish(&mut self, c: &Counters) -> Result<()> {
        self.cache = None;
        if !self.root_listed {
            let newest = c.newest;
            self.dir_times.insert(Vec::new(), newest);
        }
        for (rel, t) in std::mem::take(&mut self.dir_times) {
            let fd = if rel.is_empty() {
                rustix::fs::openat(&self.root, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            } else {
                beneath(&self.root, os(&rel), OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC)
            };
            match fd {
                Ok(fd) => rustix::fs::futimens(&fd, &Timestamps { last_access: t, last_modification: t })
                    .map_err(|e| errp("set times", &rel, e))?,
                // Replaced by a non-directory later in the layer.
                Err(Errno::NOENT) | Err(Errno::NOTDIR) | Err(Errno::LOOP) => {}
                Err(e) => return Err(errp("open", &rel, e)),
            }
        }
        Ok(())
    }
}

impl Sink for TreeWriter {
    fn entry<R: Read>(&mut self, p: Parsed, data: &mut tar::Entry<R>, lower: &mut Lower) -> Result<()> {
        self.dispatch(p, data, lower)
    }
    fn end(&mut self, c: &Counters) -> Result<()> {
        self.finish(c)
    }
}

enum Probe {
    Dir(OwnedFd),
    Missing,
    Symlink,
    NotDir,
}

fn is_whiteout(st: &rustix::fs::Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

fn open_dir_at(parent: &OwnedFd, name: &[u8], rel: &[u8], path_only: bool) -> Result<OwnedFd> {
    let flags = if path_only { OFlags::PATH } else { OFlags::RDONLY };
    beneath(parent, os(name), flags | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC)
        .map_err(|e| errp("open directory", rel, e))
}

/// A readable fd for a directory we hold as O_PATH (fsetxattr and
/// futimens need one).
fn reopen_rd(fd: &OwnedFd, rel: &[u8]) -> Result<OwnedFd> {
    rustix::fs::openat(fd, ".", OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(|e| errp("open directory", rel, e))
}

fn create_file(parent: &OwnedFd, name: &[u8], rel: &[u8]) -> Result<OwnedFd> {
    rustix::fs::openat(
        parent,
        os(name),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )
    .map_err(|e| errp("create", rel, e))
}

/// The wanted xattrs of an open file or directory.
pub(super) fn read_xattrs(fd: &impl AsFd, rel: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut names = vec![0u8; 4096];
    let n = loop {
        match rustix::fs::flistxattr(fd, &mut names[..]) {
            Ok(n) => break n,
            Err(Errno::RANGE) => names.resize(names.len() * 4, 0),
            Err(Errno::NOTSUP) => return Ok(Vec::new()),
            Err(e) => return Err(errp("list xattrs", rel, e)),
        }
    };
    let mut out = Vec::new();
    for name in names[..n].split(|&b| b == 0).filter(|n| !n.is_empty() && wanted_xattr(n)) {
        let mut v = vec![0u8; 256];
        loop {
            match rustix::fs::fgetxattr(fd, os(name), &mut v[..]) {
                Ok(k) => {
                    v.truncate(k);
                    out.push((name.to_vec(), v));
                    break;
                }
                Err(Errno::RANGE) => v.resize(v.len() * 4, 0),
                Err(Errno::NODATA) => break,
                Err(e) => return Err(errp("read xattr", rel, e)),
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Below the tree's root, never through a symlink, `..` or a mount point
/// (openat2 RESOLVE_BENEATH | NO_SYMLINKS | NO_MAGICLINKS | NO_XDEV, or
/// its fallback walk).
fn beneath(dir: &OwnedFd, rel: impl AsRef<std::ffi::OsStr>, flags: OFlags) -> std::result::Result<OwnedFd, Errno> {
    crate::kernel::beneath::open(dir, rel, flags, Mode::empty(), Mounts::Stay)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_cleaned_or_refused() {
        let ok: &[(&[u8], &[u8])] = &[
            (b"a/b", b"a/b"),
            (b"./a//b/", b"a/b"),
            (b"/abs/file", b"abs/file"),
            (b"///x", b"x"),
            (b"./", b""),
            (b".", b""),
            (b"a/./b/.", b"a/b"),
            (b"\xff\xfe/n", b"\xff\xfe/n"),
        ];
        for (i, o) in ok {
            assert_eq!(clean_path(i).unwrap(), o.to_vec(), "{:?}", show(i));
        }
        for bad in [&b"../x"[..], b"a/../../x", b"a/..", b"/.."] {
            assert!(clean_path(bad).is_err(), "{:?}", show(bad));
        }
    }

    #[test]
    fn pax_times() {
        let t = pax_time(b"1700000000.25").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (1700000000, 250_000_000));
        let t = pax_time(b"12").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (12, 0));
        let t = pax_time(b"-1.5").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (-2, 500_000_000));
        assert!(pax_time(b"x").is_none());
        assert!(pax_time(b"1.x").is_none());
    }

    #[test]
    fn compression_by_magic() {
        assert_eq!(Compression::sniff(&[0x1f, 0x8b, 8]), Compression::Gzip);
        assert_eq!(Compression::sniff(&[0x28, 0xb5, 0x2f, 0xfd]), Compression::Zstd);
        assert_eq!(Compression::sniff(&[0x50, 0x2a, 0x4d, 0x18]), Compression::Zstd);
        assert_eq!(Compression::sniff(b"etc/\0\0\0"), Compression::None);
        assert_eq!(Compression::sniff(&[]), Compression::None);
    }

    #[test]
    fn split_names() {
        assert_eq!(split_last(b"a/b/c"), (&b"a/b"[..], &b"c"[..]));
        assert_eq!(split_last(b"c"), (&b""[..], &b"c"[..]));
    }
}
