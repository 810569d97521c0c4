//! `sharedloop bundle IMAGE DIR [-o OPTIONS] [-- ARGS...]`: an OCI runtime
//! bundle (runc, crun) for an image of the store. DIR/rootfs is the image
//! mounted by mount.sharedloop (the same code, run in this process, with
//! its record and utab line: `umount DIR/rootfs` works as for any mount);
//! DIR/config.json says what the image config says to run (`spec`), as
//! the user the image names (`user`, looked up in the image's own
//! /etc/passwd and /etc/group through the mount). DIR/.sharedloop-bundle
//! marks the bundle as ours, so that `bundle --remove DIR` takes away
//! what `bundle` made and refuses any other directory.
//!
//! Every step is undone if a later one fails (`Undo`): no mount, no file,
//! no directory of ours stays.

pub mod spec;
pub mod user;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Missing, Result};
use crate::import::config::{ImageConfig, RunConfig};
use crate::store::ids::{Digest, LayerRef};
use crate::store::{Store, configs};

pub const MARKER: &str = ".sharedloop-bundle";
pub const CONFIG: &str = "config.json";
pub const ROOTFS: &str = "rootfs";
/// /etc/passwd and /etc/group larger than this are not read.
const ACCOUNTS_MAX: u64 = 4 << 20;

pub struct BundleOptions<'a> {
    pub image: &'a str,
    pub dir: &'a Path,
    /// `-o`: mount options, as mount.sharedloop takes them.
    pub options: Option<&'a OsStr>,
    /// `-- ARGS`: replaces the image's Cmd.
    pub args: Option<&'a [String]>,
    /// The store the CLI was given (`--loopback-root`, `--loopback-fallback`),
    /// passed on to the mount.
    pub store_options: Vec<u8>,
    pub verbose: bool,
}

/// `loopback_root=".."` and `loopback_fallback=".."` for the given store
/// directories, quoted (a path may hold a comma).
pub fn store_options(root: Option<&Path>, fallback: Option<&Path>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    for (k, p) in [("loopback_root", root), ("loopback_fallback", fallback)] {
        let Some(p) = p else { continue };
        if p.as_os_str().as_bytes().contains(&b'"') {
            return Err(Error::Usage(format!("{}: a store path with '\"' cannot be passed to the mount", p.display())));
        }
        if !out.is_empty() {
            out.push(b',');
        }
        out.extend_from_slice(format!("{k}=\"").as_bytes());
        out.extend_from_slice(p.as_os_str().as_bytes());
        out.push(b'"');
    }
    Ok(out)
}

/// What `.sharedloop-bundle` records.
#[derive(Serialize, Deserialize, Debug)]
struct Marker {
    image: String,
    chain: Digest,
    config: Option<Digest>,
    /// DIR was made by bundle (else it was there, empty, and stays).
    created_dir: bool,
}

/// The image config that goes with `image`, and where it comes from.
struct Found {
    chain: Digest,
    config: Option<(Digest, ImageConfig)>,
    /// Why there is none, for the user.
    why_none: Option<String>,
}

fn find_image(store: &Store, image: &str) -> Result<Found> {
    store.require()?;
    let name = match LayerRef::parse(image)? {
        LayerRef::Name(n) => n,
        r => {
            let chain = store.resolve(&r)?;
            store.chain(&chain)?;
            return Ok(Found { chain, config: None, why_none: Some(format!("{image} is a layer ID, not a name: no image config")) });
        }
    };
    // The directory the name is in (root first, the fallback under the
    // mount's rule) is the one its config record is in.
    let (chain, dir) = store
        .with_fallback(|dir, _| crate::store::read_name_in(dir, &name).map(|d| (d, dir.to_path_buf())))
        .map_err(|e| match e.errno() {
            Some(Errno::NOENT) => Error::not_found(Missing::Image, &name, store.searched()),
            _ => e,
        })?;
    store.chain(&chain)?;
    let Some(d) = configs::read_config_name_in(&dir, &name)? else {
        return Ok(Found { chain, config: None, why_none: Some(format!("image {name} has no image config (added from a directory, or imported by an older sharedloop)")) });
    };
    let data = configs::read_config_in(&dir, &d).map_err(|e| e.context(&format!("image {name}: its image config cannot be read (see sharedloop verify)")))?;
    let cfg = ImageConfig::parse(&data, &format!("image {name}: config {d}"))?;
    match cfg.top_chain(&format!("image {name}: config {d}"))? {
        Some(top) if top == chain => Ok(Found { chain, config: Some((d, cfg)), why_none: None }),
        other => Ok(Found {
            chain,
            config: None,
            why_none: Some(format!(
                "image {name}: its image config {d} is for chain {}, the name points to {chain} (re-pointed by an older sharedloop?): ignored",
                other.map(|o| o.to_string()).unwrap_or_else(|| "none".into())
            )),
        }),
    }
}

/// Everything bundle made so far, taken away on drop unless committed.
struct Undo {
    dir: PathBuf,
    created_dir: bool,
    rootfs: Option<PathBuf>,
    mounted: bool,
    files: Vec<PathBuf>,
    verbose: bool,
}

impl Undo {
    fn commit(mut self) {
        self.created_dir = false;
        self.rootfs = None;
        self.mounted = false;
        self.files.clear();
    }
}

impl Drop for Undo {
    fn drop(&mut self) {
        for f in self.files.drain(..).rev() {
            if let Err(e) = std::fs::remove_file(&f) {
                log::warn!("{}: {e}: left behind", f.display());
            }
        }
        if let Some(r) = self.rootfs.take() {
            if self.mounted
                && let Err(e) = unmount(&r, self.verbose)
            {
                log::warn!("undoing the bundle: {e}");
                return;
            }
            if let Err(e) = std::fs::remove_dir(&r) {
                log::warn!("{}: {e}: left behind", r.display());
            }
        }
        if self.created_dir
            && let Err(e) = std::fs::remove_dir(&self.dir)
        {
            log::warn!("{}: {e}: left behind", self.dir.display());
        }
    }
}

fn unmount(rootfs: &Path, verbose: bool) -> Result<()> {
    let mut a: Vec<OsString> = vec![];
    if verbose {
        a.push("-v".into());
    }
    a.push(rootfs.into());
    crate::cli::helper::umount_main(&a)
}

/// DIR, made absolute; created (its parent must exist), or an empty
/// directory already there. Returns whether it was created.
fn make_dir(dir: &Path) -> Result<(PathBuf, bool)> {
    let dir = std::path::absolute(dir).map_err(|e| Error::io("bundle directory", dir, &e))?;
    match std::fs::symlink_metadata(&dir) {
        Ok(m) if m.is_dir() => {
            let mut rd = std::fs::read_dir(&dir).map_err(|e| Error::io("read bundle directory", &dir, &e))?;
            if rd.next().is_some() {
                return Err(Error::Target(format!("{}: bundle directory is not empty", dir.display())));
            }
            Ok((dir, false))
        }
        Ok(m) => Err(Error::Target(format!(
            "{}: bundle directory is {}, not a directory",
            dir.display(),
            crate::store::file_type_name(std::os::unix::fs::MetadataExt::mode(&m))
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir(&dir).map_err(|e| Error::io("create bundle directory", &dir, &e))?;
            Ok((dir, true))
        }
        Err(e) => Err(Error::io("bundle directory", &dir, &e)),
    }
}

/// A small file of the image, read through its mount without leaving it.
/// None if the image has no such file.
fn read_image_file(rootfs_fd: &rustix::fd::OwnedFd, rootfs: &Path, rel: &str) -> Result<Option<String>> {
    let path = rootfs.join(rel);
    let fd = match crate::kernel::beneath::open_in_tree(rootfs_fd, rel, OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(None),
        Err(e @ (Errno::XDEV | Errno::LOOP)) => return Err(Error::sys("refusing a symlink that leads out of the image", &path, e)),
        Err(e) => return Err(Error::sys("open", &path, e)),
    };
    let st = rustix::fs::fstat(&fd).map_err(|e| Error::sys("stat", &path, e))?;
    if rustix::fs::FileType::from_raw_mode(st.st_mode) != rustix::fs::FileType::RegularFile {
        return Err(Error::bad_image(path.display().to_string(), format!("{}, not a regular file", crate::store::file_type_name(st.st_mode))));
    }
    if st.st_size as u64 > ACCOUNTS_MAX {
        return Err(Error::bad_image(path.display().to_string(), format!("{} bytes, more than {ACCOUNTS_MAX} read", st.st_size)));
    }
    let mut f = std::fs::File::from(fd);
    let mut buf = Vec::new();
    std::io::Read::read_to_end(&mut f, &mut buf).map_err(|e| Error::io("read", &path, &e))?;
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

pub fn bundle(store: &Store, o: &BundleOptions) -> Result<()> {
    crate::interrupt::install();
    // Everything that can be checked before anything is made.
    let found = find_image(store, o.image)?;
    let run: RunConfig = found.config.as_ref().map(|(_, c)| c.run()).unwrap_or_default();
    // A command to run, checked now (an image without a config runs the
    // default, said out loud at the end).
    if found.config.is_some() || o.args.is_some() {
        spec::arguments(&run, o.args)?;
    }
    spec::working_dir(&run)?;
    if let Some((_, c)) = &found.config {
        let (os, arch) = (c.os.as_deref().unwrap_or("linux"), c.architecture.as_deref().unwrap_or(crate::import::source::host_arch()));
        if os != "linux" || arch != crate::import::source::host_arch() {
            eprintln!("sharedloop: warning: image {} is for {os}/{arch}, this machine is linux/{}", o.image, crate::import::source::host_arch());
        }
    }

    let (dir, created_dir) = make_dir(o.dir)?;
    let mut undo = Undo { dir: dir.clone(), created_dir, rootfs: None, mounted: false, files: vec![], verbose: o.verbose };
    let rootfs = dir.join(ROOTFS);
    std::fs::create_dir(&rootfs).map_err(|e| Error::io("create", &rootfs, &e))?;
    undo.rootfs = Some(rootfs.clone());

    // The mount, by mount.sharedloop's own code.
    let mut opts = o.store_options.clone();
    if let Some(u) = o.options {
        if !opts.is_empty() && !u.is_empty() {
            opts.push(b',');
        }
        opts.extend_from_slice(u.as_bytes());
    }
    let mut margs: Vec<OsString> = vec![o.image.into(), rootfs.clone().into()];
    if !opts.is_empty() {
        margs.push("-o".into());
        margs.push(OsString::from(std::ffi::OsStr::from_bytes(&opts)));
    }
    if o.verbose {
        margs.push("-v".into());
    }
    crate::cli::helper::mount_main(&margs).map_err(|e| e.context(&format!("bundle {}: mount {}", o.image, rootfs.display())))?;
    undo.mounted = true;

    let readonly = rustix::fs::statvfs(&rootfs)
        .map(|s| s.f_flag.contains(rustix::fs::StatVfsMountFlags::RDONLY))
        .map_err(|e| Error::sys("statvfs", &rootfs, e))?;
    let rootfs_fd = rustix::fs::open(&rootfs, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::sys("open", &rootfs, e))?;
    let user_spec = run.user.clone().unwrap_or_default();
    let user = if user_spec.is_empty() {
        user::resolve("", None, None)?
    } else {
        let passwd = read_image_file(&rootfs_fd, &rootfs, "etc/passwd")?;
        let group = read_image_file(&rootfs_fd, &rootfs, "etc/group")?;
        user::resolve(&user_spec, passwd.as_deref(), group.as_deref())?
    };
    if readonly {
        for m in spec::MOUNT_POINTS {
            let rel = &m[1..];
            if let Err(Errno::NOENT) = crate::kernel::beneath::open_in_tree(&rootfs_fd, rel, OFlags::PATH) {
                eprintln!(
                    "sharedloop: warning: image {} has no {m}, which runc cannot create on a read-only rootfs; bundle it with -o upper=tmpfs",
                    o.image
                );
            }
        }
    }
    drop(rootfs_fd);

    let default_args: Vec<String> = spec::DEFAULT_ARGS.iter().map(|s| s.to_string()).collect();
    let args = match (o.args, &found.config) {
        (Some(a), _) => Some(a),
        (None, None) => Some(default_args.as_slice()),
        (None, Some(_)) => None,
    };
    let mut annotations = vec![("org.sharedloop.image", o.image.to_string()), ("org.sharedloop.chain", found.chain.to_string())];
    if let Some((d, _)) = &found.config {
        annotations.push(("org.sharedloop.config", d.to_string()));
    }
    let doc = spec::runtime_spec(&spec::SpecInput { run: &run, args, user: &user, readonly, hostname: "sharedloop", annotations: &annotations })?;
    let marker = Marker { image: o.image.into(), chain: found.chain, config: found.config.as_ref().map(|(d, _)| *d), created_dir };
    // The marker first: a bundle --remove after a crash right here finds it.
    let mpath = dir.join(MARKER);
    crate::store::write_synced(&mpath, &serde_json::to_vec_pretty(&marker).expect("serialize"))?;
    undo.files.push(mpath);
    let cpath = dir.join(CONFIG);
    let mut text = serde_json::to_vec_pretty(&doc).expect("serialize");
    text.push(b'\n');
    crate::store::write_synced(&cpath, &text)?;
    undo.files.push(cpath);
    undo.commit();
    if let Some(why) = &found.why_none {
        eprintln!(
            "sharedloop: {why}; config.json has the defaults: args {:?}, env {}, cwd /, user 0:0",
            args.unwrap_or_default(),
            spec::DEFAULT_PATH
        );
    }
    log::info!("bundle {} for {} ({}), rootfs {}", dir.display(), o.image, found.chain, if readonly { "read-only" } else { "writable" });
    Ok(())
}

/// `bundle --remove DIR`: unmount DIR/rootfs and remove what bundle wrote.
pub fn unbundle(dir: &Path, verbose: bool) -> Result<()> {
    crate::interrupt::install();
    let dir = std::path::absolute(dir).map_err(|e| Error::io("bundle directory", dir, &e))?;
    let mpath = dir.join(MARKER);
    let marker: Marker = match std::fs::symlink_metadata(&mpath) {
        Ok(m) if m.is_file() => {
            let data = std::fs::read(&mpath).map_err(|e| Error::io("read", &mpath, &e))?;
            serde_json::from_slice(&data).map_err(|e| Error::Target(format!("{}: not a sharedloop bundle ({}: {e})", dir.display(), mpath.display())))?
        }
        Ok(_) => return Err(Error::Target(format!("{}: not a sharedloop bundle ({MARKER} is not a regular file)", dir.display()))),
        Err(e) => {
            return Err(Error::Target(format!(
                "{}: not a sharedloop bundle (no {MARKER}: {})",
                dir.display(),
                crate::error::Errno::from_io(&e)
            )));
        }
    };
    let rootfs = dir.join(ROOTFS);
    let canon = std::fs::canonicalize(&rootfs).ok();
    if let Some(c) = &canon {
        let mounts = crate::kernel::mountinfo::read()?;
        if crate::kernel::mountinfo::find_at(&mounts, c).is_some() {
            unmount(c, verbose)?;
        }
    }
    match std::fs::remove_dir(&rootfs) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(Error::io("remove (not written by bundle, left as it is)", &rootfs, &e)),
    }
    for f in [CONFIG, MARKER] {
        let p = dir.join(f);
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io("remove", &p, &e)),
        }
    }
    if marker.created_dir
        && let Err(e) = std::fs::remove_dir(&dir)
    {
        eprintln!("sharedloop: {}: kept ({e}): it holds files bundle did not write", dir.display());
    }
    log::info!("removed bundle {} of {}", dir.display(), marker.image);
    Ok(())
}
