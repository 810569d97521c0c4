//! Where an image comes from: the transports skopeo names `oci:DIR[:TAG]`,
//! `oci-archive:FILE[:TAG]` and `docker-archive:FILE[:REF]`, read down to
//! one list of layers (blob location, blob digest, diff ID).
//!
//! An archive is never unpacked: one pass over its tar headers (seeking
//! past the data) records where each member's bytes are, and every blob is
//! then read straight from the archive file. An archive that cannot be
//! read in place (a pipe, or a gzip/zstd-compressed archive) is first
//! copied, decompressed, into a staging file under the store's tmp/.
//!
//! Everything read here is checked before it is trusted: the manifest and
//! config against the digests that point to them, layer blobs (later, while
//! they stream) against the manifest, uncompressed layers against the
//! config's diff IDs.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};
use crate::store::ids::Digest;

/// Manifests, configs and indexes are small; anything larger is refused
/// rather than read into memory.
const JSON_MAX: u64 = 32 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Oci,
    OciArchive,
    DockerArchive,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Oci => "oci",
            Transport::OciArchive => "oci-archive",
            Transport::DockerArchive => "docker-archive",
        }
    }
}

/// A parsed SOURCE argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SourceRef {
    pub transport: Transport,
    pub path: PathBuf,
    /// TAG (oci, oci-archive) or REF (docker-archive).
    pub reference: Option<String>,
}

impl SourceRef {
    /// `TRANSPORT:PATH[:REF]`. As in skopeo (containers/image), the path
    /// ends at the first ':' after the transport, so the reference may
    /// itself hold colons (`docker-archive:x.tar:busybox:1.36`).
    pub fn parse(s: &str) -> Result<SourceRef> {
        let bad = |why: &str| {
            Error::Usage(format!(
                "{s:?}: {why} (want oci:DIR[:TAG], oci-archive:FILE[:TAG], docker-archive:FILE[:REF] or docker://REF)"
            ))
        };
        let (t, rest) = s.split_once(':').ok_or_else(|| bad("no transport"))?;
        let transport = match t {
            "oci" => Transport::Oci,
            "oci-archive" => Transport::OciArchive,
            "docker-archive" => Transport::DockerArchive,
            "docker" => return Err(bad("a registry image is docker://REF")),
            _ => return Err(bad(&format!("unknown transport {t:?}"))),
        };
        let (path, reference) = match rest.split_once(':') {
            Some((p, r)) => (p, Some(r)),
            None => (rest, None),
        };
        if path.is_empty() {
            return Err(bad("empty path"));
        }
        if reference == Some("") {
            return Err(bad("empty tag or reference after ':'"));
        }
        Ok(SourceRef { transport, path: PathBuf::from(path), reference: reference.map(String::from) })
    }
}

impl std::fmt::Display for SourceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.transport.as_str(), self.path.display())?;
        if let Some(r) = &self.reference {
            write!(f, ":{r}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- layouts

/// Files of an image layout or archive, by '/'-separated relative path.
pub trait Layout: Send + Sync {
    /// A reader for the file and its size.
    fn open(&self, rel: &str) -> Result<(Box<dyn Read + Send + '_>, u64)>;
    /// For messages.
    fn describe(&self, rel: &str) -> String;
}

/// A small file, whole; refused if larger than `limit`.
pub fn read_small(l: &dyn Layout, rel: &str, limit: u64) -> Result<Vec<u8>> {
    let (r, size) = l.open(rel)?;
    if size > limit {
        return Err(Error::bad_image(l.describe(rel), format!("{size} bytes, more than the {limit} expected")));
    }
    let mut out = Vec::with_capacity(size as usize);
    r.take(limit + 1)
        .read_to_end(&mut out)
        .map_err(|e| Error::io("read", l.describe(rel), &e))?;
    Ok(out)
}

/// Relative paths inside a layout must stay inside it.
fn check_rel(rel: &str) -> Result<()> {
    if rel.is_empty() || rel.starts_with('/') || rel.split('/').any(|c| c == "..") {
        return Err(Error::bad_image(format!("{rel:?}"), "path outside the image layout"));
    }
    Ok(())
}

/// An OCI image layout directory.
pub struct DirLayout {
    pub root: PathBuf,
}

impl Layout for DirLayout {
    fn open(&self, rel: &str) -> Result<(Box<dyn Read + Send + '_>, u64)> {
        check_rel(rel)?;
        let p = self.root.join(rel);
        let f = File::open(&p).map_err(|e| Error::io("open", &p, &e))?;
        let m = f.metadata().map_err(|e| Error::io("stat", &p, &e))?;
        if !m.is_file() {
            return Err(Error::bad_image(p.display().to_string(), "not a regular file"));
        }
        Ok((Box::new(f), m.len()))
    }
    fn describe(&self, rel: &str) -> String {
        self.root.join(rel).display().to_string()
    }
}

#[derive(Clone, Debug)]
enum Member {
    File { offset: u64, size: u64 },
    /// Symlink or hard link to another member (docker save links the
    /// layer.tar of a repeated layer to the first copy).
    Link(String),
}

/// A tar archive read in place: member offsets from one pass over the
/// headers, data read with pread.
pub struct ArchiveLayout {
    file: File,
    path: PathBuf,
    members: HashMap<String, Member>,
}

/// "./a//b/" -> "a/b"; None if it climbs out.
fn clean_member(p: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(p).ok()?;
    let mut parts: Vec<&str> = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            c => parts.push(c),
        }
    }
    Some(parts.join("/"))
}

impl ArchiveLayout {
    pub fn scan(file: File, path: &Path) -> Result<ArchiveLayout> {
        let len = file.metadata().map_err(|e| Error::io("stat", path, &e))?.len();
        let mut members = HashMap::new();
        // Where the header after the last entry is: the end-of-archive block.
        let mut end: u64 = 0;
        {
            let mut ar = tar::Archive::new(&file);
            let err = |e: io::Error| Error::bad_image_io(format!("{}: not a readable tar archive", path.display()), &e);
            for ent in ar.entries_with_seek().map_err(err)? {
                let ent = ent.map_err(err)?;
                end = ent.raw_file_position() + ent.size().div_ceil(512) * 512;
                let Some(name) = clean_member(&ent.path_bytes()) else { continue };
                let kind = ent.header().entry_type();
                let m = if kind.is_file() {
                    let (offset, size) = (ent.raw_file_position(), ent.size());
                    if offset.checked_add(size).is_none_or(|end| end > len) {
                        return Err(Error::bad_image(path.display().to_string(), format!("archive is truncated (member {name} needs bytes up to {}, the file has {len})", offset.saturating_add(size))));
                    }
                    Member::File { offset, size }
                } else if kind.is_symlink() || kind.is_hard_link() {
                    let Some(target) = ent.link_name_bytes() else { continue };
                    let base = if kind.is_symlink() { name.rsplit_once('/').map(|(d, _)| d).unwrap_or("") } else { "" };
                    let joined = if base.is_empty() { target.to_vec() } else { [base.as_bytes(), b"/", &target].concat() };
                    match clean_member(&joined) {
                        Some(t) => Member::Link(t),
                        None => continue,
                    }
                } else {
                    continue;
                };
                members.insert(name, m);
            }
        }
        // The tar reader stops quietly at the end of the file as at the end
        // of the archive; a writer that finished wrote a zero block there.
        let mut block = [0u8; 512];
        let whole = file.read_exact_at(&mut block, end).is_ok() && block.iter().all(|&b| b == 0);
        if !whole {
            return Err(Error::bad_image(path.display().to_string(), format!("archive is truncated (no end-of-archive block at byte {end}; the file has {len})")));
        }
        Ok(ArchiveLayout { file, path: path.to_path_buf(), members })
    }

    fn resolve(&self, rel: &str) -> Result<(u64, u64)> {
        let mut cur = rel.to_string();
        for _ in 0..16 {
            match self.members.get(&cur) {
                Some(Member::File { offset, size }) => return Ok((*offset, *size)),
                Some(Member::Link(t)) => cur = t.clone(),
                None => {
                    return Err(Error::bad_image(self.path.display().to_string(), format!("no member {rel} in the archive")));
                }
            }
        }
        Err(Error::bad_image(self.path.display().to_string(), format!("member {rel}: too many links")))
    }
}

impl Layout for ArchiveLayout {
    fn open(&self, rel: &str) -> Result<(Box<dyn Read + Send + '_>, u64)> {
        check_rel(rel)?;
        let (offset, size) = self.resolve(rel)?;
        Ok((Box::new(Section { file: &self.file, path: &self.path, pos: offset, left: size }), size))
    }
    fn describe(&self, rel: &str) -> String {
        format!("{}: {rel}", self.path.display())
    }
}

/// `left` bytes of `file` from `pos`; a short file is an error, not EOF.
struct Section<'a> {
    file: &'a File,
    path: &'a Path,
    pos: u64,
    left: u64,
}

impl Read for Section<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.file.read_at(&mut buf[..want], self.pos)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{}: archive truncated at byte {}", self.path.display(), self.pos),
            ));
        }
        self.pos += n as u64;
        self.left -= n as u64;
        Ok(n)
    }
}

// ---------------------------------------------------------------- image

/// One layer to import, bottom first.
#[derive(Clone, Debug)]
pub struct LayerSpec {
    /// Where the blob is in the layout.
    pub rel: String,
    /// The blob's digest, when the source states one (always for OCI).
    pub digest: Option<Digest>,
    pub size: Option<u64>,
    pub media_type: Option<String>,
    /// sha256 of the uncompressed layer tar, from the image config.
    pub diff_id: Digest,
}

pub struct Image {
    pub layout: Box<dyn Layout>,
    pub layers: Vec<LayerSpec>,
    /// The tag or reference the image was picked by (the default name).
    pub reference: Option<String>,
    /// The image config, verbatim, checked against its digest where the
    /// source names one (kept in the store for `bundle`).
    pub config: Vec<u8>,
}

#[derive(Deserialize, Debug, Clone)]
pub(crate) struct Descriptor {
    #[serde(rename = "mediaType", default)]
    pub(crate) media_type: Option<String>,
    pub(crate) digest: String,
    pub(crate) size: u64,
    #[serde(default)]
    pub(crate) annotations: Option<HashMap<String, String>>,
    #[serde(default)]
    pub(crate) platform: Option<DescPlatform>,
}

#[derive(Deserialize, Debug, Clone)]
/// An index entry's platform (registry pulls choose by variant too).
pub(crate) struct DescPlatform {
    pub(crate) architecture: String,
    pub(crate) os: String,
    #[serde(default)]
    pub(crate) variant: Option<String>,
}

#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Config {
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct DockerEntry {
    #[serde(rename = "Config")]
    config: String,
    #[serde(rename = "RepoTags", default)]
    repo_tags: Option<Vec<String>>,
    #[serde(rename = "Layers")]
    layers: Vec<String>,
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

fn sha256_digest(s: &str, what: &str) -> Result<Digest> {
    match s.split_once(':') {
        Some(("sha256", _)) => {
            Digest::parse(s).map_err(|_| Error::bad_image(what, format!("malformed digest {s:?}")))
        }
        Some((alg, _)) => Err(Error::bad_image(what, format!("digest algorithm {alg:?} is not supported (only sha256)"))),
        None => Err(Error::bad_image(what, format!("malformed digest {s:?}"))),
    }
}

fn blob_rel(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// Read a blob a descriptor points to and check it against the descriptor.
fn read_verified(l: &dyn Layout, desc: &Descriptor, what: &str) -> Result<Vec<u8>> {
    let d = sha256_digest(&desc.digest, what)?;
    let rel = blob_rel(&d);
    let data = read_small(l, &rel, JSON_MAX).map_err(|e| e.context(what))?;
    check_bytes(&data, &d, Some(desc.size), &format!("{what} {}", l.describe(&rel)))?;
    Ok(data)
}

fn check_bytes(data: &[u8], d: &Digest, size: Option<u64>, what: &str) -> Result<()> {
    let got = Digest::from_bytes(Sha256::digest(data).into());
    if &got != d {
        return Err(Error::mismatch(what, "digest", format!("expected {d}"), format!("content has {got}")));
    }
    if let Some(s) = size
        && s != data.len() as u64
    {
        return Err(Error::mismatch(what, "size", format!("expected {s} bytes"), format!("found {}", data.len())));
    }
    Ok(())
}

fn json<T: for<'de> Deserialize<'de>>(data: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(data).map_err(|e| Error::bad_image(what, format!("invalid JSON: {e}")))
}

/// The GOARCH name of the machine we run on, as OCI platforms spell it.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "x86" => "386",
        "aarch64" => "arm64",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "loongarch64" => "loong64",
        other => other,
    }
}

fn is_index(media_type: Option<&str>, v: &serde_json::Value) -> bool {
    matches!(
        media_type,
        Some("application/vnd.oci.image.index.v1+json")
            | Some("application/vnd.docker.distribution.manifest.list.v2+json")
    ) || (v.get("manifests").is_some() && v.get("layers").is_none())
}

/// Of several manifests, the one for this machine (linux/host arch); the
/// only one if there is just one.
fn pick_platform<'a>(cands: &[&'a Descriptor], what: &str) -> Result<&'a Descriptor> {
    if cands.len() == 1 {
        return Ok(cands[0]);
    }
    let arch = host_arch();
    let mine: Vec<&&Descriptor> = cands
        .iter()
        .filter(|d| d.platform.as_ref().is_some_and(|p| p.os == "linux" && p.architecture == arch))
        .collect();
    match mine.as_slice() {
        [one] => Ok(one),
        [] => Err(Error::bad_image(what, format!("{} manifests, none for linux/{arch}", cands.len()))),
        _ => Err(Error::bad_image(what, format!("{} manifests for linux/{arch}, cannot choose", mine.len()))),
    }
}

/// An OCI image layout (directory or archive): index.json, the manifest
/// named `tag` (or the only one), its config.
pub fn open_oci(layout: Box<dyn Layout>, tag: Option<&str>, what: &str) -> Result<Image> {
    let l = layout.as_ref();
    let marker = read_small(l, "oci-layout", 4096).map_err(|e| {
        let errno = e.errno().map(crate::error::Errno);
        Error::Store(crate::error::StoreError::BadImage {
            what: what.into(),
            why: format!("not an OCI image layout (no readable oci-layout file: {e})"),
            errno,
        })
    })?;
    let v: serde_json::Value = json(&marker, &l.describe("oci-layout"))?;
    if v.get("imageLayoutVersion").and_then(|x| x.as_str()).is_none() {
        return Err(Error::bad_image(l.describe("oci-layout"), "no imageLayoutVersion"));
    }
    let index: Index = json(&read_small(l, "index.json", JSON_MAX)?, &l.describe("index.json"))?;
    let tags = || {
        let t: Vec<&str> = index
            .manifests
            .iter()
            .filter_map(|d| d.annotations.as_ref().and_then(|a| a.get(REF_NAME)).map(String::as_str))
            .collect();
        if t.is_empty() { "none".to_string() } else { t.join(", ") }
    };
    let cands: Vec<&Descriptor> = match tag {
        Some(t) => index
            .manifests
            .iter()
            .filter(|d| d.annotations.as_ref().and_then(|a| a.get(REF_NAME)).map(String::as_str) == Some(t))
            .collect(),
        None => index.manifests.iter().collect(),
    };
    let desc = match (cands.len(), tag) {
        (0, Some(t)) => return Err(Error::bad_image(what, format!("no image tagged {t:?} (tags: {})", tags()))),
        (0, None) => return Err(Error::bad_image(what, "index.json lists no image")),
        (1, _) => cands[0].clone(),
        (_, Some(_)) => pick_platform(&cands, what)?.clone(),
        (n, None) => {
            return Err(Error::bad_image(what, format!("{n} images in index.json; name one as {what}:TAG (tags: {})", tags())));
        }
    };
    let manifest = resolve_manifest(l, desc, what, 0)?;
    let config_data = read_verified(l, &manifest.config, "config")?;
    let config: Config = json(&config_data, &format!("{what}: config"))?;
    let diff_ids = diff_ids(&config, what)?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(Error::bad_image(what, format!("manifest has {} layers but the config {} diff IDs", manifest.layers.len(), diff_ids.len())));
    }
    let mut layers = Vec::with_capacity(diff_ids.len());
    for (i, (d, diff_id)) in manifest.layers.iter().zip(diff_ids).enumerate() {
        let digest = sha256_digest(&d.digest, &format!("{what}: layer {}", i + 1))?;
        check_media_type(d.media_type.as_deref(), &format!("{what}: layer {} ({digest})", i + 1))?;
        layers.push(LayerSpec {
            rel: blob_rel(&digest),
            digest: Some(digest),
            size: Some(d.size),
            media_type: d.media_type.clone(),
            diff_id,
        });
    }
    Ok(Image { layout, layers, reference: tag.map(String::from), config: config_data })
}

/// Follow an index down to one image manifest (indexes may nest).
fn resolve_manifest(l: &dyn Layout, desc: Descriptor, what: &str, depth: u32) -> Result<Manifest> {
    if depth > 4 {
        return Err(Error::bad_image(what, "image indexes nested too deep"));
    }
    let data = read_verified(l, &desc, "manifest")?;
    let v: serde_json::Value = json(&data, &format!("{what}: manifest {}", desc.digest))?;
    if is_index(desc.media_type.as_deref(), &v) {
        let idx: Index = json(&data, &format!("{what}: index {}", desc.digest))?;
        let cands: Vec<&Descriptor> = idx.manifests.iter().collect();
        if cands.is_empty() {
            return Err(Error::bad_image(what, format!("index {} lists no manifest", desc.digest)));
        }
        let next = pick_platform(&cands, what)?.clone();
        return resolve_manifest(l, next, what, depth + 1);
    }
    json(&data, &format!("{what}: manifest {}", desc.digest))
}

fn diff_ids(config: &Config, what: &str) -> Result<Vec<Digest>> {
    if let Some(k) = &config.rootfs.kind
        && k != "layers"
    {
        return Err(Error::bad_image(what, format!("config rootfs type {k:?}, expected \"layers\"")));
    }
    config
        .rootfs
        .diff_ids
        .iter()
        .enumerate()
        .map(|(i, d)| sha256_digest(d, &format!("{what}: config diff ID {}", i + 1)))
        .collect()
}

/// Layers we can read: plain, gzip or zstd tars (the compression is told
/// by the blob's first bytes). Encrypted layers are refused.
pub fn check_media_type(mt: Option<&str>, what: &str) -> Result<()> {
    if let Some(mt) = mt
        && (mt.contains("encrypted") || !(mt.contains(".layer.") || mt.contains(".rootfs.")))
    {
        return Err(Error::bad_image(what, format!("unsupported layer media type {mt:?}")));
    }
    Ok(())
}

/// docker.io/library/NAME:latest for "NAME" and friends, so that a REF
/// matches RepoTags however either is spelled.
pub fn normalize_ref(r: &str) -> String {
    let (name, tag_or_digest) = match (r.find('@'), r.rfind(':')) {
        (Some(i), _) => (&r[..i], &r[i..]),
        (None, Some(i)) if !r[i..].contains('/') => (&r[..i], &r[i..]),
        _ => (r, ":latest"),
    };
    let first = name.split('/').next().unwrap_or("");
    let has_domain = name.contains('/') && (first.contains('.') || first.contains(':') || first == "localhost");
    let full = if has_domain {
        name.to_string()
    } else if name.contains('/') {
        format!("docker.io/{name}")
    } else {
        format!("docker.io/library/{name}")
    };
    format!("{full}{tag_or_digest}")
}

/// `docker save` / `podman save` / `skopeo copy ... docker-archive:`.
pub fn open_docker(layout: Box<dyn Layout>, reference: Option<&str>, what: &str) -> Result<Image> {
    let l = layout.as_ref();
    let entries: Vec<DockerEntry> = json(&read_small(l, "manifest.json", JSON_MAX)?, &l.describe("manifest.json"))?;
    let all_tags = || {
        let t: Vec<String> = entries.iter().flat_map(|e| e.repo_tags.clone().unwrap_or_default()).collect();
        if t.is_empty() { "none".to_string() } else { t.join(", ") }
    };
    let (entry, name) = match reference {
        Some(r) if r.starts_with('@') => {
            let i: usize = r[1..]
                .parse()
                .map_err(|_| Error::Usage(format!("{what}:{r}: @N needs an image index")))?;
            let e = entries
                .get(i)
                .ok_or_else(|| Error::bad_image(what, format!("no image @{i}, the archive has {}", entries.len())))?;
            (e, e.repo_tags.as_ref().and_then(|t| t.first().cloned()))
        }
        Some(r) => {
            let want = normalize_ref(r);
            let e = entries
                .iter()
                .find(|e| e.repo_tags.iter().flatten().any(|t| normalize_ref(t) == want))
                .ok_or_else(|| Error::bad_image(what, format!("no image {r:?} in the archive (tags: {})", all_tags())))?;
            (e, Some(r.to_string()))
        }
        None => match entries.as_slice() {
            [one] => (one, one.repo_tags.as_ref().and_then(|t| t.first().cloned())),
            [] => return Err(Error::bad_image(what, "manifest.json lists no image")),
            _ => {
                return Err(Error::bad_image(what, format!("{} images in the archive; name one as {what}:REF or {what}:@N (tags: {})", entries.len(), all_tags())));
            }
        },
    };
    check_rel(&entry.config)?;
    let cfg_data = read_small(l, &entry.config, JSON_MAX)?;
    // The config's file name is its digest (the image ID) in every writer
    // we know; check it when it looks like one.
    if let Some(d) = named_digest(&entry.config, ".json") {
        check_bytes(&cfg_data, &d, None, &format!("config {}", l.describe(&entry.config)))?;
    }
    let config: Config = json(&cfg_data, &l.describe(&entry.config))?;
    let diff_ids = diff_ids(&config, what)?;
    if diff_ids.len() != entry.layers.len() {
        return Err(Error::bad_image(what, format!("manifest.json has {} layers but the config {} diff IDs", entry.layers.len(), diff_ids.len())));
    }
    let layers = entry
        .layers
        .iter()
        .zip(diff_ids)
        .map(|(rel, diff_id)| {
            check_rel(rel)?;
            Ok(LayerSpec {
                rel: rel.clone(),
                digest: named_digest(rel, ".tar"),
                size: None,
                media_type: None,
                diff_id,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Image { layout, layers, reference: name, config: cfg_data })
}

/// `blobs/sha256/HEX` or `HEX<ext>`: a file named by its own digest.
fn named_digest(rel: &str, ext: &str) -> Option<Digest> {
    if let Some(h) = rel.strip_prefix("blobs/sha256/") {
        return Digest::from_hex(h);
    }
    rel.strip_suffix(ext).and_then(Digest::from_hex)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_sources() {
        type Want<'a> = Option<(Transport, &'a str, Option<&'a str>)>;
        let cases: &[(&str, Want)] = &[
            ("oci:/x/lay", Some((Transport::Oci, "/x/lay", None))),
            ("oci:/x/lay:v1", Some((Transport::Oci, "/x/lay", Some("v1")))),
            ("oci-archive:a.tar:latest", Some((Transport::OciArchive, "a.tar", Some("latest")))),
            (
                "docker-archive:/t/b.tar:docker.io/library/busybox:1.36",
                Some((Transport::DockerArchive, "/t/b.tar", Some("docker.io/library/busybox:1.36"))),
            ),
            ("docker-archive:b.tar:@1", Some((Transport::DockerArchive, "b.tar", Some("@1")))),
            // docker:// is a pull (`registry`), never a local source.
            ("docker://busybox", None),
            ("docker:busybox", None),
            ("oci:", None),
            ("oci:dir:", None),
            ("/just/a/path", None),
        ];
        for (s, want) in cases {
            let got = SourceRef::parse(s).ok().map(|r| (r.transport, r.path, r.reference));
            let want = want.map(|(t, p, r)| (t, PathBuf::from(p), r.map(String::from)));
            assert_eq!(got, want, "{s}");
        }
        assert_eq!(SourceRef::parse("oci:/a:b").unwrap().to_string(), "oci:/a:b");
    }

    #[test]
    fn normalized_refs() {
        for (a, b) in [
            ("busybox", "docker.io/library/busybox:latest"),
            ("busybox:1.36", "docker.io/library/busybox:1.36"),
            ("library/busybox:1.36", "docker.io/library/busybox:1.36"),
            ("docker.io/library/busybox:1.36", "docker.io/library/busybox:1.36"),
            ("quay.io/a/b", "quay.io/a/b:latest"),
            ("localhost:5000/a:t", "localhost:5000/a:t"),
            ("localhost/a", "localhost/a:latest"),
            ("a@sha256:00", "docker.io/library/a@sha256:00"),
        ] {
            assert_eq!(normalize_ref(a), b, "{a}");
        }
    }

    #[test]
    fn member_paths() {
        assert_eq!(clean_member(b"./blobs//sha256/ab").as_deref(), Some("blobs/sha256/ab"));
        assert_eq!(clean_member(b"a/../b").as_deref(), Some("b"));
        assert_eq!(clean_member(b"../x"), None);
        assert_eq!(clean_member(b"./").as_deref(), Some(""));
    }

    #[test]
    fn media_types() {
        for ok in [
            None,
            Some("application/vnd.oci.image.layer.v1.tar"),
            Some("application/vnd.oci.image.layer.v1.tar+gzip"),
            Some("application/vnd.oci.image.layer.v1.tar+zstd"),
            Some("application/vnd.docker.image.rootfs.diff.tar.gzip"),
            Some("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
        ] {
            assert!(check_media_type(ok, "t").is_ok(), "{ok:?}");
        }
        for bad in [
            "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
            "application/vnd.oci.image.config.v1+json",
        ] {
            assert!(check_media_type(Some(bad), "t").is_err(), "{bad}");
        }
    }

    /// A scratch directory for layouts written by the tests below.
    struct Scratch(PathBuf);
    impl Scratch {
        fn new(name: &str) -> Scratch {
            let p = std::env::temp_dir().join(format!("sl-src-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(p.join("blobs/sha256")).unwrap();
            Scratch(p)
        }
        /// Store a blob; its descriptor.
        fn put(&self, media_type: &str, data: &[u8]) -> serde_json::Value {
            let d = Digest::from_bytes(Sha256::digest(data).into());
            std::fs::write(self.0.join(blob_rel(&d)), data).unwrap();
            serde_json::json!({"mediaType": media_type, "digest": d.to_string(), "size": data.len()})
        }
        fn image(&self, diff: &str) -> serde_json::Value {
            let layer = self.put("application/vnd.oci.image.layer.v1.tar", diff.as_bytes());
            let diff_id = Digest::of_bytes(diff.as_bytes()).to_string();
            let cfg = self.put(
                "application/vnd.oci.image.config.v1+json",
                serde_json::json!({"rootfs": {"type": "layers", "diff_ids": [diff_id]}}).to_string().as_bytes(),
            );
            let m = serde_json::json!({"schemaVersion": 2, "config": cfg, "layers": [layer]});
            self.put("application/vnd.oci.image.manifest.v1+json", m.to_string().as_bytes())
        }
        fn layout(&self) -> Box<dyn Layout> {
            Box::new(DirLayout { root: self.0.clone() })
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn with_platform(mut d: serde_json::Value, arch: &str) -> serde_json::Value {
        d["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        d
    }

    #[test]
    fn oci_index_nested_and_tags() {
        let t = Scratch::new("oci");
        let mine = with_platform(t.image("mine"), host_arch());
        let other = with_platform(t.image("other"), "s390x-not-this");
        let idx = serde_json::json!({"schemaVersion": 2, "manifests": [other, mine]});
        let mut idx_desc = t.put("application/vnd.oci.image.index.v1+json", idx.to_string().as_bytes());
        idx_desc["annotations"] = serde_json::json!({REF_NAME: "multi"});
        let mut single = t.image("single");
        single["annotations"] = serde_json::json!({REF_NAME: "one"});
        let top = serde_json::json!({"schemaVersion": 2, "manifests": [idx_desc, single]});
        std::fs::write(t.0.join("index.json"), top.to_string()).unwrap();
        std::fs::write(t.0.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();

        let img = open_oci(t.layout(), Some("multi"), "oci:x").unwrap();
        assert_eq!(img.layers.len(), 1);
        assert_eq!(img.layers[0].diff_id, Digest::of_bytes(b"mine"), "the host's platform");
        assert_eq!(img.reference.as_deref(), Some("multi"));
        let img = open_oci(t.layout(), Some("one"), "oci:x").unwrap();
        assert_eq!(img.layers[0].diff_id, Digest::of_bytes(b"single"));
        let e = open_oci(t.layout(), None, "oci:x").err().unwrap().to_string();
        assert!(e.contains("2 images in index.json") && e.contains("tags: multi, one"), "{e}");
        let e = open_oci(t.layout(), Some("two"), "oci:x").err().unwrap().to_string();
        assert!(e.contains("no image tagged \"two\""), "{e}");

        // A manifest blob that is not what the index says.
        let m = t.0.join(format!("blobs/sha256/{}", &single_digest(&t)[7..]));
        let mut data = std::fs::read(&m).unwrap();
        data.push(b' ');
        std::fs::write(&m, data).unwrap();
        let e = open_oci(t.layout(), Some("one"), "oci:x").err().unwrap().to_string();
        assert!(e.contains("digest mismatch"), "{e}");
    }

    fn single_digest(t: &Scratch) -> String {
        let top: serde_json::Value = serde_json::from_slice(&std::fs::read(t.0.join("index.json")).unwrap()).unwrap();
        top["manifests"][1]["digest"].as_str().unwrap().to_string()
    }

    #[test]
    fn docker_archive_picks_by_ref_or_index() {
        let t = Scratch::new("docker");
        let mut entries = vec![];
        for (i, tags) in [vec!["docker.io/library/a:1"], vec!["quay.io/x/b:2", "b:latest"]].iter().enumerate() {
            let diff = format!("layer{i}");
            let diff_id = Digest::of_bytes(diff.as_bytes());
            std::fs::write(t.0.join(format!("{}.tar", diff_id.hex())), &diff).unwrap();
            let cfg = serde_json::json!({"rootfs": {"type": "layers", "diff_ids": [diff_id.to_string()]}}).to_string();
            let cfg_name = format!("{}.json", Digest::of_bytes(cfg.as_bytes()).hex());
            std::fs::write(t.0.join(&cfg_name), &cfg).unwrap();
            entries.push(serde_json::json!({"Config": cfg_name, "RepoTags": tags, "Layers": [format!("{}.tar", diff_id.hex())]}));
        }
        std::fs::write(t.0.join("manifest.json"), serde_json::Value::Array(entries).to_string()).unwrap();
        let pick = |r: Option<&str>| open_docker(t.layout(), r, "docker-archive:x");
        let e = pick(None).err().unwrap().to_string();
        assert!(e.contains("2 images") && e.contains("docker.io/library/a:1, quay.io/x/b:2, b:latest"), "{e}");
        let a = pick(Some("a:1")).unwrap();
        assert_eq!((a.layers[0].diff_id, a.reference.as_deref()), (Digest::of_bytes(b"layer0"), Some("a:1")));
        assert_eq!(a.layers[0].digest, Some(Digest::of_bytes(b"layer0")), "HEX.tar names its digest");
        let b = pick(Some("@1")).unwrap();
        assert_eq!((b.layers[0].diff_id, b.reference.as_deref()), (Digest::of_bytes(b"layer1"), Some("quay.io/x/b:2")));
        assert_eq!(pick(Some("b")).unwrap().layers[0].diff_id, Digest::of_bytes(b"layer1"));
        assert!(pick(Some("@2")).is_err());
        assert!(pick(Some("c:1")).err().unwrap().to_string().contains("no image \"c:1\""));
        // A config whose name (its digest) does not match its content.
        let cfg = std::fs::read_dir(&t.0).unwrap().flatten().find(|e| e.file_name().to_string_lossy().ends_with(".json") && e.file_name() != "manifest.json").unwrap().path();
        std::fs::write(&cfg, "{}").unwrap();
        let e = match (pick(Some("a:1")), pick(Some("@1"))) {
            (Err(e), _) | (_, Err(e)) => e.to_string(),
            _ => panic!("a changed config went unnoticed"),
        };
        assert!(e.contains("digest mismatch"), "{e}");
    }

    #[test]
    fn digest_names() {
        let h = "a".repeat(64);
        assert!(named_digest(&format!("blobs/sha256/{h}"), ".tar").is_some());
        assert!(named_digest(&format!("{h}.tar"), ".tar").is_some());
        assert!(named_digest(&format!("{h}/layer.tar"), ".tar").is_none());
        assert!(sha256_digest("sha512:ab", "x").unwrap_err().to_string().contains("sha512"));
    }
}
