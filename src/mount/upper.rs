//! The writable upper (a tmpfs or an image on a loop device), mounted the
//! way the chosen way hands it to overlayfs: a detached mount for the fd
//! way, a mount in the scratch for the path and legacy ways — with the new
//! mount API where the kernel has it (so a refusal carries the kernel's
//! reason), else with mount(2).

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::mount::{MountAttrFlags, MountFlags};

use super::{Plan, loop_record};
use crate::error::{Error, Result};
use crate::interrupt::step;
use crate::kernel::Feature;
use crate::kernel::loopdev::{self, AttachOptions};
use crate::kernel::mountapi::{FsContext, attach_at};
use crate::mount::opts::UpperSpec;
use crate::mount::state::UpperRecord;
use crate::upper;

pub struct UpperReady {
    /// The upper filesystem's root, held (a detached mount lives as long
    /// as an fd of it) until the overlay has its own reference.
    pub _root: OwnedFd,
    pub upper_dir: OwnedFd,
    pub work_dir: OwnedFd,
    pub record: UpperRecord,
}

/// One filesystem to mount for the upper.
struct Fs<'a> {
    fstype: &'a str,
    source: &'a str,
    /// key=value options.
    data: Vec<(&'a str, String)>,
    what: String,
    path: PathBuf,
    attrs: MountAttrFlags,
    flags: MountFlags,
}

/// Mount `fs` detached (`at` None; needs the new mount API) or at `at`.
/// `explain` turns the kernel's refusal into our message.
fn mount(fs: &Fs, at: Option<&Path>, explain: impl Fn(Error) -> Error) -> Result<OwnedFd> {
    if Feature::NewMountApi.have() {
        let ctx = FsContext::open(fs.fstype, &fs.what, &fs.path)?;
        ctx.set_string("source", fs.source)?;
        for (k, v) in &fs.data {
            ctx.set_string(k, v)?;
        }
        ctx.create().map_err(explain)?;
        let mnt = ctx.mount(fs.attrs)?;
        if let Some(dir) = at {
            attach_at(&mnt, dir)?;
        }
        return Ok(mnt);
    }
    let Some(dir) = at else {
        Feature::NewMountApi.require(&format!("{} as a detached mount", fs.what))?;
        return Err(Error::Internal("a detached mount asked of mount(2)".into()));
    };
    let data: Vec<String> = fs.data.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let data = std::ffi::CString::new(data.join(",")).map_err(|_| Error::Internal("NUL in upper options".into()))?;
    rustix::mount::mount(fs.source, dir, fs.fstype, fs.flags, data.as_c_str())
        .map_err(|e| explain(Error::sys(format!("{}: mount {}", fs.what, fs.fstype), &fs.path, e)))?;
    rustix::fs::open(dir, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()).map_err(|e| Error::sys("open upper", dir, e))
}

impl Plan {
    /// The upper, if the plan has one: detached (`at` None) or at `at`.
    pub(super) fn prepare_upper(&self, at: Option<&Path>) -> Result<Option<UpperReady>> {
        let Some(spec) = &self.upper else { return Ok(None) };
        match spec {
            UpperSpec::Tmpfs => {
                step("upper-mount", None)?;
                let fs = Fs {
                    fstype: "tmpfs",
                    source: "sharedloop-upper",
                    data: vec![("size", self.upper_create.size.to_string()), ("mode", "0755".into())],
                    what: "tmpfs upper".into(),
                    path: self.target.clone(),
                    attrs: MountAttrFlags::empty(),
                    flags: MountFlags::empty(),
                };
                let root = mount(&fs, at, |e| e)?;
                let (upper_dir, work_dir) = upper::ensure_dirs(&root, Path::new("tmpfs upper"))?;
                Ok(Some(UpperReady {
                    _root: root,
                    upper_dir,
                    work_dir,
                    record: UpperRecord { kind: "tmpfs".into(), image: None, fstype: "tmpfs".into(), loop_dev: None },
                }))
            }
            UpperSpec::Named(n) => self.upper_image(upper::open_named(&self.store, n, &self.upper_create)?, at).map(Some),
            UpperSpec::Path(p) => self.upper_image(upper::open_path(p, &self.upper_create)?, at).map(Some),
        }
    }

    fn upper_image(&self, img: upper::UpperImage, at: Option<&Path>) -> Result<UpperReady> {
        upper::lock(&img)?;
        step("upper-attach", None)?;
        let dev = loopdev::attach(
            &img.fd,
            &img.path,
            AttachOptions { read_only: false, direct_io: self.direct_io, configure: self.loop_configure },
        )
        .map_err(|e| e.context("upper"))?;
        step("upper-mount", None)?;
        let dev_path = dev.path();
        let source = dev_path.to_string_lossy();
        let fs = Fs {
            fstype: img.fstype.as_str(),
            source: &source,
            data: vec![],
            what: format!("upper {}", img.path.display()),
            path: dev_path.clone(),
            attrs: MountAttrFlags::MOUNT_ATTR_NODEV,
            flags: MountFlags::NODEV,
        };
        let root = mount(&fs, at, |e| upper::explain_mount_failure(&img, e))?;
        let (upper_dir, work_dir) = upper::ensure_dirs(&root, &img.path)?;
        let record = UpperRecord {
            kind: "image".into(),
            image: Some(img.path.clone()),
            fstype: img.fstype.as_str().into(),
            loop_dev: Some(loop_record(&dev)),
        };
        Ok(UpperReady { _root: root, upper_dir, work_dir, record })
    }
}
