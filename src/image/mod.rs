//! `sharedloop add`: turn a directory (an unpacked layer in overlayfs form)
//! into a read-only filesystem image in the store.
//!
//! Two things are computed from the directory: its OCI diff ID (sha256 of a
//! deterministic tar stream, with overlay whiteouts translated back into OCI
//! `.wh.` entries, so the ID is what the image's own diff would be), and the
//! image itself (ext4, xfs or erofs), sized from a walk of the tree.
//!
//! This file is the `add` entry; the parts are `walk` (the tree walk both
//! passes share), `xattr`, `tar` (the diff-ID tar writer), `size` (the
//! plan a walk gives) and `build` (what every image build shares) with the
//! builders `ext4`, `xfs` and `erofs`.

mod build;
mod erofs;
pub mod erofs_writer;
mod ext4;
mod size;
mod tar;
pub mod superblock;
#[cfg(test)]
mod testutil;
mod walk;
mod xattr;
mod xfs;

use std::path::Path;

use crate::error::{Error, Missing, Result};
use crate::store::ids::{Digest, Name, chain_id};
use crate::interrupt::step;
use crate::store::staging::Workspace;
use crate::store::{self, FsType, LayerMeta, Staging, Store};
use walk::check_dir;

pub use build::{build_image, build_image_compressed};

/// A UUID (RFC 4122 variant, version 8) made from `key` (a diff ID):
/// the same layer gives the same image bytes.
pub fn uuid_for(key: &str) -> [u8; 16] {
    use sha2::Digest as _;
    build::uuid_bytes(&sha2::Sha256::digest(key.as_bytes())[..16])
}
pub use tar::{diff_id_of_dir, pax_record};

/// What `sharedloop add` was asked: DIR, its parent layer, an optional name.
pub struct AddOptions<'a> {
    pub dir: &'a Path,
    pub parent: Option<Digest>,
    pub name: Option<&'a Name>,
    pub fstype: FsType,
    /// LZ4-compress erofs files (`--compress lz4`).
    pub compress: bool,
    pub quiet: bool,
    /// Node-local staging directory (`--staging-dir`, `staging_dir=`);
    /// `None`: `tmp/` of the fallback store.
    pub staging_dir: Option<&'a Path>,
}

/// The whole of `sharedloop add`: check DIR and the parent, compute the
/// diff ID and chain ID, build the image in node-local staging and publish
/// it unless either store has that chain ID already, and record `name`
/// (also for an existing layer) in the store directory the layer lives in.
/// Returns the chain ID.
pub fn add_layer(store: &Store, opts: &AddOptions) -> Result<Digest> {
    crate::interrupt::install();
    check_dir(opts.dir)?;
    if let Some(p) = &opts.parent {
        check_parent(store, p)?;
    }
    let diff_id = diff_id_of_dir(opts.dir)?;
    let chain = chain_id(opts.parent.as_ref(), &diff_id);
    if let Some(which) = store.has_layer(&chain)? {
        say(
            opts,
            format_args!(
                "layer {chain} is already in the {which} store {}",
                store.dir(which).display()
            ),
        );
        // The chain ID names the content, not its format: one layer per
        // ID, so the one stored stays. Say so when another was asked for.
        if let Ok(meta) = Store::read_meta_in(store.dir(which), &chain)
            && meta.fstype != opts.fstype
        {
            log::warn!(
                "layer {chain} is stored as {} in {}; not stored again as {} (`sharedloop rm` it first to change its format)",
                meta.fstype,
                store.dir(which).display(),
                opts.fstype
            );
        }
        // Asking for a name on an existing layer still means "name it".
        return name_layer(store.dir(which), opts, &chain);
    }
    // The destination first: a store that cannot take the layer fails
    // before the build. Only the finished image goes there.
    let staging = Staging::create(store, &format!("layer-{}", chain.hex()))?;
    let store_dir = staging.store_dir.clone();
    let work = Workspace::new(store, opts.staging_dir).create(&format!("add-{}", chain.hex()))?;
    let img = work.path.join("layer.img");
    let size = build_image_compressed(opts.dir, opts.fstype, opts.compress, &img).map_err(|e| e.context(&format!("layer {chain}")))?;
    step("add-publish", None)?;
    staging.put_image(&img)?;
    drop(work);
    let meta = LayerMeta {
        chain_id: chain,
        diff_id,
        parent: opts.parent,
        fstype: opts.fstype,
        size,
        created: store::now_secs(),
    };
    let dest = staging.publish_layer(&meta)?;
    say(
        opts,
        format_args!(
            "added layer {chain} ({}, {size} bytes) at {}",
            opts.fstype,
            dest.display()
        ),
    );
    name_layer(&store_dir, opts, &chain)
}

// ---------------------------------------------------------------- add helpers

fn check_parent(store: &Store, parent: &Digest) -> Result<()> {
    match store.has_layer(parent)? {
        Some(_) => Ok(()),
        None => Err(Error::not_found(
            Missing::Parent,
            parent,
            format!("{} nor {}", store.root.display(), store.fallback.display()),
        )),
    }
}

fn name_layer(store_dir: &Path, opts: &AddOptions, chain: &Digest) -> Result<Digest> {
    if let Some(name) = opts.name {
        store::write_name(store_dir, name, chain)?;
        // A directory has no image config: one kept for what the name
        // pointed to before is not this image's.
        store::configs::forget_config_name(store_dir, name)?;
        say(
            opts,
            format_args!("named {chain} {name} in {}", store_dir.display()),
        );
    }
    Ok(*chain)
}

fn say(opts: &AddOptions, msg: std::fmt::Arguments) {
    if !opts.quiet {
        eprintln!("sharedloop: {msg}");
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use rustix::fs::FileType;
    use rustix::io::Errno;

    use super::*;
    use crate::store::Which;
    use testutil::*;

    #[test]
    fn sockets_and_non_directories_are_refused() {
        let d = TestDir::new("sock");
        let sock = d.join("s");
        let _l = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let e = diff_id_of_dir(&d.0).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::OPNOTSUPP));
        assert!(e.to_string().contains(&sock.display().to_string()), "{e}");
        let e = build_image(&d.0, FsType::Ext4, &d.join("out.img")).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::OPNOTSUPP));
        assert!(!d.join("out.img").exists());

        let e = diff_id_of_dir(&sock).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOTDIR));
        let e = diff_id_of_dir(&d.join("missing")).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOENT));
    }

    fn opts<'a>(
        dir: &'a Path,
        parent: Option<Digest>,
        name: Option<&'a Name>,
        fstype: FsType,
    ) -> AddOptions<'a> {
        AddOptions {
            dir,
            parent,
            name,
            fstype,
            compress: false,
            quiet: true,
            staging_dir: None,
        }
    }

    #[test]
    fn add_layer_end_to_end() {
        let t = TestDir::new("add");
        let store = Store::new(t.join("root"), t.join("fallback"));
        let base = t.join("base");
        std::fs::create_dir(&base).unwrap();
        sample_tree(&base);
        let name = Name::parse("test/base:1").unwrap();

        let id1 = add_layer(&store, &opts(&base, None, Some(&name), FsType::Ext4)).unwrap();
        let diff1 = diff_id_of_dir(&base).unwrap();
        assert_eq!(id1, chain_id(None, &diff1));
        let layer_dir = t.join("root/layers").join(id1.hex());
        let img_len = std::fs::metadata(layer_dir.join("layer.img"))
            .unwrap()
            .len();
        let meta = Store::read_meta_in(&store.root, &id1).unwrap();
        assert_eq!(
            (meta.diff_id, meta.parent, meta.fstype, meta.size),
            (diff1, None, FsType::Ext4, img_len)
        );
        assert!(meta.created > 0);
        assert_eq!(store.read_name(&name).unwrap(), id1);
        let name2 = Name::parse("test/base:latest").unwrap();
        let again = add_layer(&store, &opts(&base, None, Some(&name2), FsType::Ext4)).unwrap();
        assert_eq!(again, id1);
        assert_eq!(store.read_name(&name2).unwrap(), id1);

        let top = t.join("top");
        std::fs::create_dir(&top).unwrap();
        write(&top.join("new"), b"new");
        mknod(&top.join("a"), FileType::CharacterDevice, (0, 0));
        let o = opts(&top, Some(id1), None, FsType::Erofs);
        let id2 = add_layer(&store, &o).unwrap();
        assert_eq!(id2, chain_id(Some(&id1), &diff_id_of_dir(&top).unwrap()));
        assert_eq!(
            Store::read_meta_in(&store.root, &id2).unwrap().parent,
            Some(id1)
        );
        assert!(
            t.join("root/layers")
                .join(id2.hex())
                .join("layer.img")
                .is_file()
        );

        // Again: same ID, nothing rebuilt, nothing left in tmp.
        let before = std::fs::metadata(t.join("root/layers").join(id2.hex()).join("meta.json"))
            .unwrap()
            .ino();
        assert_eq!(add_layer(&store, &o).unwrap(), id2);
        let after = std::fs::metadata(t.join("root/layers").join(id2.hex()).join("meta.json"))
            .unwrap()
            .ino();
        assert_eq!(before, after);
        assert_eq!(std::fs::read_dir(t.join("root/tmp")).unwrap().count(), 0);
        // The fallback holds the (node-local) staging, emptied, and no
        // layer or name while the root works.
        assert_eq!(std::fs::read_dir(t.join("fallback/tmp")).unwrap().count(), 0);
        assert_eq!(
            std::fs::read_dir(t.join("fallback")).unwrap().count(),
            1,
            "fallback has only tmp/"
        );
        assert_eq!(store.has_layer(&id2).unwrap(), Some(Which::Root));
    }

    #[test]
    fn add_layer_validates_dir_and_parent() {
        let t = TestDir::new("addval");
        let store = Store::new(t.join("root"), t.join("fallback"));
        let dir = t.join("dir");
        std::fs::create_dir(&dir).unwrap();
        let missing = Digest::of_bytes(b"no such layer");
        let e = add_layer(&store, &opts(&dir, Some(missing), None, FsType::Ext4)).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "parent {missing}: not found in {} nor {}",
                store.root.display(),
                store.fallback.display()
            )
        );
        let e = add_layer(&store, &opts(&t.join("nope"), None, None, FsType::Ext4)).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOENT));
        write(&t.join("file"), b"");
        let e = add_layer(&store, &opts(&t.join("file"), None, None, FsType::Ext4)).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOTDIR));
        assert!(
            e.to_string()
                .contains(&t.join("file").display().to_string())
        );
        assert!(!t.join("root").exists() && !t.join("fallback").exists());
    }

    #[test]
    fn add_layer_reports_enotdir_root_without_falling_back() {
        let t = TestDir::new("enotdir");
        write(&t.join("plain"), b"");
        let store = Store::new(t.join("plain/root"), t.join("fallback"));
        let dir = t.join("dir");
        std::fs::create_dir(&dir).unwrap();
        let e = add_layer(&store, &opts(&dir, None, None, FsType::Ext4)).unwrap_err();
        assert_eq!(e.errno(), Some(Errno::NOTDIR), "{e}");
        assert!(
            e.to_string().contains(&store.root.display().to_string()),
            "{e}"
        );
        assert!(!t.join("fallback").exists());
    }

    #[test]
    fn add_layer_creates_a_missing_root() {
        let t = TestDir::new("newroot");
        let store = Store::new(t.join("new/deeper/root"), t.join("fallback"));
        let dir = t.join("dir");
        std::fs::create_dir(&dir).unwrap();
        write(&dir.join("f"), b"f");
        let id = add_layer(&store, &opts(&dir, None, None, FsType::Erofs)).unwrap();
        assert!(
            store
                .root
                .join("layers")
                .join(id.hex())
                .join("layer.img")
                .is_file()
        );
        assert!(!t.join("fallback/layers").exists());
    }
}
