//! `sharedloop import SOURCE`: an OCI or Docker image, layer by layer,
//! into the store.
//!
//! For each layer, bottom first: its chain ID comes from the config's diff
//! IDs alone, so a layer that either store directory has already is
//! skipped without its blob even being opened. Any other layer's blob is
//! streamed once — decompressed, both digests checked on the way — into a
//! directory tree in overlay form in a node-local work directory
//! (`crate::store::staging`; `unpack`), built there into a filesystem image by
//! `image` (ext4, xfs); for erofs the stream goes straight into the erofs
//! writer instead, with no tree (`stream_erofs`); only the image goes to a staging directory under the
//! store's tmp/ (renamed, or copied when the store is another filesystem)
//! and is published with one rename. A layer is published before the next
//! is unpacked, so the next can read the chain below it when its tar needs
//! to (`lower`). Every staging and work directory is held by a guard and
//! removed on every path out, errors and SIGINT/SIGTERM included; after a
//! SIGKILL only `import-*` and `layer-*` directories stay (in the store's
//! and the local staging's tmp/), which no later import looks at (each
//! import's staging names carry host, pid and time).
//!
//! Concurrent imports of one image (processes, mount namespaces or nodes
//! sharing the store) each build what they find missing; the first rename
//! wins, the others drop their copy, and names are written with a rename
//! too, so everyone ends with one complete copy of each layer.

pub mod config;
pub mod lower;
pub mod progress;
pub mod registry;
pub mod source;
pub mod stream_erofs;
pub mod unpack;

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Missing, Result, StoreError};
use crate::interrupt::step;
use crate::store::ids::{Digest, Name, chain_id};
use crate::store::staging::{WorkDir, Workspace};
use crate::store::{self, FsType, LayerMeta, MAX_LAYERS, Staging, Store, Which};

use lower::{Lower, Mounts};
use progress::{Progress, mib};
use source::{ArchiveLayout, DirLayout, Image, LayerSpec, SourceRef, Transport};
use stream_erofs::stream_erofs;
use unpack::{Expect, unpack_layer};

pub struct ImportOptions<'a> {
    /// `oci:DIR[:TAG]`, `oci-archive:FILE[:TAG]`, `docker-archive:FILE[:REF]`
    /// or `docker://REF`.
    pub source: &'a str,
    /// The name to record; default the TAG or REF the image was picked by.
    pub name: Option<&'a Name>,
    pub fstype: FsType,
    /// LZ4-compress erofs files (`--compress lz4`).
    pub compress: bool,
    pub quiet: bool,
    /// Node-local staging directory (`--staging-dir`, `staging_dir=`);
    /// `None`: `tmp/` of the fallback store.
    pub staging_dir: Option<&'a Path>,
    /// Authentication, TLS and platform of a `docker://` pull.
    pub registry: registry::RegistryOptions,
}

/// Import the image; returns the chain ID of its top layer.
pub fn import(store: &Store, opts: &ImportOptions) -> Result<Digest> {
    crate::interrupt::install();
    let work = Workspace::new(store, opts.staging_dir);
    // A pull leaves a layout (and a claim on its chain) in a work
    // directory: held to the end, as a spooled archive is.
    let (image, what, _pulled, _spool) = if let Some(r) = opts.source.strip_prefix("docker://") {
        let r = registry::DockerRef::parse(r)?;
        let p = registry::pull(store, &work, &r, &opts.registry, opts.quiet)?;
        let registry::Pulled { image, work, claim } = p;
        (image, r.to_string(), Some((work, claim)), None)
    } else {
        let given = opts.registry.given();
        if !given.is_empty() {
            return Err(Error::Usage(format!(
                "{}: only for a docker:// source, not {}",
                given.join(", "),
                opts.source
            )));
        }
        let src = SourceRef::parse(opts.source)?;
        let (image, spool) = open_image(&work, &src)?;
        (image, format!("{}:{}", src.transport.as_str(), src.path.display()), None, spool)
    };
    let n = image.layers.len();
    if n == 0 {
        return Err(Error::bad_image(what, "the image has no layers"));
    }
    if n > MAX_LAYERS {
        return Err(Error::bad_image(
            what,
            format!("{n} layers; overlayfs mounts at most {MAX_LAYERS}, so the image could never be mounted"),
        ));
    }
    // Claim the whole chain first: gc and rm keep what a live import needs.
    let chain_ids: Vec<Digest> = image
        .layers
        .iter()
        .scan(None, |p: &mut Option<Digest>, l| {
            let c = chain_id(p.as_ref(), &l.diff_id);
            *p = Some(c);
            Some(c)
        })
        .collect();
    let _claim = store::Claim::create(store, &chain_ids)?;
    let progress = Progress::new(opts.quiet, n);
    let mut mounts = Mounts::new();
    let mut parent: Option<Digest> = None;
    for (i, l) in image.layers.iter().enumerate() {
        step("import-layer", Some(i))?;
        let chain = chain_id(parent.as_ref(), &l.diff_id);
        progress.start(i, &chain, l.size);
        match store.has_layer(&chain)? {
            Some(which) => {
                // One image per chain ID: a layer stored in another format
                // stays as it is, and the note says so.
                let other = Store::read_meta_in(store.dir(which), &chain)
                    .ok()
                    .filter(|m| m.fstype != opts.fstype)
                    .map(|m| format!(" as {} (one image per layer: not stored again as {}; `sharedloop rm` it first to change its format)", m.fstype, opts.fstype))
                    .unwrap_or_else(|| {
                        // Same format, erofs: the compression may differ.
                        let img = store.dir(which).join("layers").join(chain.hex()).join("layer.img");
                        let stored = std::fs::File::open(&img)
                            .ok()
                            .and_then(|f| crate::image::superblock::read_at(&f, 0, 1024 + 128).ok())
                            .map(|h| crate::image::superblock::erofs_lz4(&h));
                        let name = |lz4: bool| if lz4 { "lz4" } else { "none" };
                        match stored {
                            Some(lz4) if opts.fstype == FsType::Erofs && lz4 != opts.compress => format!(
                                " with compression {} (one image per layer: not stored again with compression {}; `sharedloop rm` it first to change it)",
                                name(lz4),
                                name(opts.compress)
                            ),
                            _ => String::new(),
                        }
                    });
                log::info!("layer {}/{n} {chain}: already in the {which} store{other}", i + 1);
                progress.done(i, &chain, l.size, &format!("already in the {which} store{other}"));
            }
            None => {
                let ctx = format!(
                    "layer {}/{n} ({})",
                    i + 1,
                    l.digest.map(|d| d.to_string()).unwrap_or_else(|| l.rel.clone())
                );
                let job = Job {
                    store,
                    work: &work,
                    image: &image,
                    index: i,
                    layer: l,
                    parent,
                    chain,
                    fstype: opts.fstype,
                    compress: opts.compress,
                    progress: &progress,
                };
                let (bytes, note) = job.run(&mut mounts).map_err(|e| match e {
                    Error::Interrupted => e,
                    e => e.context(&ctx),
                })?;
                progress.done(i, &chain, Some(bytes), &note);
            }
        }
        parent = Some(chain);
    }
    progress.finish();
    drop(mounts);
    let top = parent.expect("at least one layer");
    let name = match opts.name {
        Some(n) => Some(n.clone()),
        None => image.reference.as_deref().and_then(|r| match Name::parse(r) {
            Ok(n) => Some(n),
            Err(e) => {
                log::warn!("not recording the image's own name: {e}");
                if !opts.quiet {
                    eprintln!("sharedloop: not recording the image's own name: {e}; use --name");
                }
                None
            }
        }),
    };
    // A layer we skipped as already stored may have been removed (rm, gc)
    // while we worked: never name a chain that cannot be mounted.
    store.chain(&top).map_err(|e| {
        Error::Store(StoreError::Vanished {
            what: "the imported chain is not whole, a layer vanished during the import (rm or gc?)".into(),
            source: Box::new(e),
        })
    })?;
    if let Some(name) = name {
        // Beside the top layer, where mount looks first for it.
        let which = store.has_layer(&top)?.ok_or_else(|| {
            Error::not_found(Missing::Layer, top, format!("{} right after the import", store.searched()))
        })?;
        let dir = store.dir(which);
        // The config first, its pointer after the name: a reader that
        // finds the pointer finds the config, and checks it against the
        // name (an older sharedloop re-points names, never pointers).
        let cfg = store::configs::put_config(dir, &image.config)?;
        store::write_name(dir, &name, &top)?;
        store::configs::name_config(dir, &name, &cfg)?;
        log::info!("named {top} {name} in {} (image config {cfg})", dir.display());
    }
    Ok(top)
}

/// The image behind SOURCE (and the spooled copy of a piped archive,
/// removed when dropped).
fn open_image(work: &Workspace, src: &SourceRef) -> Result<(Image, Option<WorkDir>)> {
    let what = format!("{}:{}", src.transport.as_str(), src.path.display());
    let reference = src.reference.as_deref();
    match src.transport {
        Transport::Oci => {
            let m = std::fs::metadata(&src.path).map_err(|e| Error::io("image layout", &src.path, &e))?;
            if !m.is_dir() {
                return Err(Error::bad_image(what, "not a directory (an OCI archive is oci-archive:FILE)"));
            }
            let img = source::open_oci(Box::new(DirLayout { root: src.path.clone() }), reference, &what)?;
            Ok((img, None))
        }
        Transport::OciArchive | Transport::DockerArchive => {
            let (file, spool) = open_archive(work, &src.path)?;
            let layout = Box::new(ArchiveLayout::scan(file, &src.path)?);
            let img = if src.transport == Transport::OciArchive {
                source::open_oci(layout, reference, &what)?
            } else {
                source::open_docker(layout, reference, &what)?
            };
            Ok((img, spool))
        }
    }
}

/// The archive file. One that cannot be read in place — a pipe, or a
/// compressed archive (`docker save | gzip`) — is first copied, plain,
/// into a node-local staging file.
fn open_archive(work: &Workspace, path: &Path) -> Result<(File, Option<WorkDir>)> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).map_err(|e| Error::io("open archive", path, &e))?;
    let m = f.metadata().map_err(|e| Error::io("stat", path, &e))?;
    if m.is_dir() {
        return Err(Error::bad_image(
            path.display().to_string(),
            "is a directory (an OCI layout directory is oci:DIR)",
        ));
    }
    if m.is_file() {
        let mut head = [0u8; 4];
        let n = f.read_at(&mut head, 0).map_err(|e| Error::io("read archive", path, &e))?;
        if unpack::Compression::sniff(&head[..n]) == unpack::Compression::None {
            return Ok((f, None));
        }
    }
    let spool = work.create("import-spool")?;
    let p = spool.path.join("archive.tar");
    let mut out = File::create_new(&p).map_err(|e| Error::io("create", &p, &e))?;
    let (mut r, c) = unpack::decompressed(std::io::BufReader::with_capacity(1 << 20, f))
        .map_err(|e| Error::io("read archive", path, &e))?;
    log::info!("{}: {} archive, copied to {}", path.display(), c.as_str(), p.display());
    std::io::copy(&mut r, &mut out).map_err(|e| Error::io(format!("copy archive to {}", p.display()), path, &e))?;
    drop(out);
    let f = File::open(&p).map_err(|e| Error::io("open", &p, &e))?;
    Ok((f, Some(spool)))
}

/// One layer to convert.
struct Job<'a> {
    store: &'a Store,
    work: &'a Workspace<'a>,
    image: &'a Image,
    index: usize,
    layer: &'a LayerSpec,
    parent: Option<Digest>,
    chain: Digest,
    fstype: FsType,
    compress: bool,
    progress: &'a Progress,
}

impl Job<'_> {
    /// Unpack and build in node-local staging, copy (or rename) the image
    /// into the store's staging, publish. Returns the blob's size and a
    /// note for the progress line.
    fn run(&self, mounts: &mut Mounts) -> Result<(u64, String)> {
        let (i, l, chain) = (self.index, self.layer, self.chain);
        let t = std::time::Instant::now();
        // The destination first: a store that cannot take the layer fails
        // before the work. It receives the finished image only.
        let out = Staging::create(self.store, &format!("layer-{}", chain.hex()))?;
        let work = self.work.create(&format!("import-{}", chain.hex()))?;
        let (reader, _) = self.image.layout.open(&l.rel)?;
        let mut lower = Lower::new(self.store, self.parent, mounts);
        let expect = Expect { blob: l.digest, blob_size: l.size, diff_id: l.diff_id };
        let progress = self.progress;
        let img = work.path.join("layer.img");
        // erofs: the image straight from the tar stream, no tree; the
        // others: a tree, then mkfs from it.
        let (stats, size, tree) = if self.fstype == FsType::Erofs {
            let uuid = crate::image::uuid_for(&l.diff_id.to_string());
            let (stats, size) =
                stream_erofs(reader, &img, uuid, self.compress, &mut lower, &expect, &|n| progress.bytes(n))?;
            (stats, Some(size), None)
        } else {
            let tree = work.path.join("rootfs");
            std::fs::create_dir(&tree).map_err(|e| Error::io("create staging tree", &tree, &e))?;
            let stats = unpack_layer(reader, &tree, &mut lower, &expect, &|n| progress.bytes(n))?;
            (stats, None, Some(tree))
        };
        step("import-unpacked", Some(i))?;
        // The overlay goes now, not after the (long) image build; the layer
        // mounts below it stay for the layers above.
        drop(lower);
        log::info!(
            "layer {}: {} entries, {} blob, {} tar{}{}{}",
            chain.short(),
            stats.entries,
            stats.compression.unwrap_or("?"),
            mib(stats.tar_bytes),
            if stats.lower_used { ", read the layers below" } else { "" },
            if stats.ignored_xattrs > 0 {
                format!(", {} xattrs of other namespaces ignored", stats.ignored_xattrs)
            } else {
                String::new()
            },
            if tree.is_none() { ", erofs image written from the stream" } else { "" }
        );
        // A concurrent import may have finished this layer meanwhile.
        if let Some(which) = self.store.has_layer(&chain)? {
            return Ok((stats.blob_bytes, format!("published meanwhile by another import in the {which} store")));
        }
        // With erofs the image is built already (the pause point stays, for
        // tests and for the same order of steps).
        step("import-build", Some(i))?;
        let size = match (size, &tree) {
            (Some(size), _) => size,
            (None, Some(tree)) => {
                self.progress.phase(&chain, &format!("building {} image", self.fstype));
                let size = crate::image::build_image(tree, self.fstype, &img)?;
                // The tree is not needed any more: free the local disk now.
                if let Err(e) = std::fs::remove_dir_all(tree) {
                    log::warn!("{}: {e} (removed with its staging directory later)", tree.display());
                }
                size
            }
            (None, None) => unreachable!("a tree or a size"),
        };
        step("import-publish", Some(i))?;
        self.progress.phase(&chain, "moving the image into the store");
        let copied = out.put_image(&img)?;
        drop(work);
        let which = out.which;
        let meta = LayerMeta {
            chain_id: chain,
            diff_id: l.diff_id,
            parent: self.parent,
            fstype: self.fstype,
            size,
            created: store::now_secs(),
        };
        out.publish_layer(&meta)?;
        let place = if which == Which::Root { "" } else { ", in the fallback store" };
        let note = format!(
            "{}, {} image{}{place}, {:.1} s",
            stats.compression.unwrap_or("?"),
            self.fstype,
            if copied { " copied in" } else { "" },
            t.elapsed().as_secs_f64()
        );
        Ok((stats.blob_bytes, note))
    }
}
