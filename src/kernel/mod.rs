//! What the running kernel can do, found by trying it.
//!
//! Distribution kernels backport features (RHEL 8's 4.18 has pieces of
//! 5.x) and leave others out of their configuration (erofs' file-backed
//! mounts are a config option), so a version number says little. Each
//! feature is probed the way util-linux does for LOOP_CONFIGURE: make the
//! call in a form that cannot change anything and read the errno (ENOSYS,
//! EINVAL, ENOTTY, ENOTBLK mean "not here"). Each probe runs at most once
//! per process, when first needed; the version string is only shown.

pub mod beneath;
pub mod loopdev;
pub mod mountapi;
pub mod mountinfo;
pub mod procs;
// All `unsafe` lives here, each block with a `// SAFETY:` note.
#[allow(unsafe_code)]
pub mod sys;

use std::fmt;
use std::sync::OnceLock;

use rustix::fs::{Mode, OFlags, ResolveFlags};
use rustix::io::Errno;
use rustix::mount::FsOpenFlags;

use crate::error::{Error, Result};

pub const OSRELEASE: &str = "/proc/sys/kernel/osrelease";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

impl Version {
    /// "6.18.44-fc-v669" -> 6.18.44; "4.0-rc1" -> 4.0.0.
    pub fn parse(release: &str) -> Option<Version> {
        let core = release.trim().split(|c: char| !(c.is_ascii_digit() || c == '.')).next()?;
        let mut it = core.split('.').filter(|s| !s.is_empty()).map(|s| s.parse::<u32>());
        let major = it.next()?.ok()?;
        let minor = it.next()?.ok()?;
        let patch = it.next().and_then(|r| r.ok()).unwrap_or(0);
        Some(Version(major, minor, patch))
    }

    pub fn running() -> Result<Version> {
        let s = release()?;
        Version::parse(&s).ok_or_else(|| Error::Unsupported(format!("{OSRELEASE}: cannot parse kernel release {:?}", s.trim())))
    }

    /// Multiple lower layers in one overlay mount (4.0). The one check
    /// still made by version: it predates every kernel sharedloop
    /// supports (4.18) and cannot be tried without mounting.
    pub fn has_multi_lower(self) -> bool {
        self >= Version(4, 0, 0)
    }
}

/// The release string, as shown (`uname -r`).
pub fn release() -> Result<String> {
    std::fs::read_to_string(OSRELEASE).map(|s| s.trim().to_string()).map_err(|e| Error::io("read kernel version", OSRELEASE, &e))
}

/// One probed feature: present or not, and what the probe saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub have: bool,
    /// "fsconfig lowerdir+ by fd: Invalid argument (os error 22)", for
    /// refusals and `-v`.
    pub seen: String,
}

impl Probe {
    fn yes(seen: impl Into<String>) -> Probe {
        Probe { have: true, seen: seen.into() }
    }
    fn no(what: &str, e: Errno) -> Probe {
        Probe { have: false, seen: format!("{what}: {}", crate::error::Errno(e)) }
    }
}

/// The features sharedloop chooses between.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Feature {
    /// openat2 with RESOLVE_* (5.6): store lookups that refuse symlinks in
    /// one call; without it, a walk component by component (see `beneath`).
    Openat2,
    /// fsopen/fsconfig/fsmount/move_mount (5.2): detached mounts, kernel
    /// messages on refusal; without it, mount(2) in a private scratch.
    NewMountApi,
    /// LOOP_CONFIGURE (5.8): attach and set flags in one call; without
    /// it, LOOP_SET_FD + LOOP_SET_STATUS64 + LOOP_SET_DIRECT_IO.
    LoopConfigure,
    /// overlayfs `lowerdir+` (6.8): one layer per fsconfig call, no limit
    /// of a page of options.
    LowerdirAdd,
    /// overlayfs layers handed over as file descriptors (6.13): layer
    /// mounts never appear in any mount tree.
    LayersAsFds,
    /// erofs mounting an image file with no loop device (6.12, if built
    /// with CONFIG_EROFS_FS_BACKED_BY_FILE).
    ErofsFromFile,
}

pub const ALL: [Feature; 6] = [
    Feature::Openat2,
    Feature::NewMountApi,
    Feature::LoopConfigure,
    Feature::LowerdirAdd,
    Feature::LayersAsFds,
    Feature::ErofsFromFile,
];

impl Feature {
    /// What a refusal calls it, with the mainline version it came in.
    pub fn describe(self) -> &'static str {
        match self {
            Feature::Openat2 => "openat2 (Linux 5.6)",
            Feature::NewMountApi => "the new mount API, fsopen/fsmount (Linux 5.2)",
            Feature::LoopConfigure => "LOOP_CONFIGURE (Linux 5.8)",
            Feature::LowerdirAdd => "overlayfs lowerdir+ (Linux 6.8)",
            Feature::LayersAsFds => "overlayfs layers given as file descriptors (Linux 6.13)",
            Feature::ErofsFromFile => "erofs mounts of image files (Linux 6.12, CONFIG_EROFS_FS_BACKED_BY_FILE)",
        }
    }

    /// The name `status` shows.
    pub fn short(self) -> &'static str {
        match self {
            Feature::Openat2 => "openat2",
            Feature::NewMountApi => "new mount API",
            Feature::LoopConfigure => "LOOP_CONFIGURE",
            Feature::LowerdirAdd => "lowerdir+",
            Feature::LayersAsFds => "layers as fds",
            Feature::ErofsFromFile => "erofs from file",
        }
    }

    fn slot(self) -> &'static OnceLock<Probe> {
        static SLOTS: [OnceLock<Probe>; 6] = [const { OnceLock::new() }; 6];
        &SLOTS[self as usize]
    }

    /// The probe's result, made on first use.
    pub fn probe(self) -> &'static Probe {
        self.slot().get_or_init(|| {
            let p = match self {
                Feature::Openat2 => probe_openat2(),
                Feature::NewMountApi => probe_new_mount_api(),
                Feature::LoopConfigure => probe_loop_configure(),
                Feature::LowerdirAdd => probe_overlay(false),
                Feature::LayersAsFds => probe_overlay(true),
                Feature::ErofsFromFile => probe_erofs_file(),
            };
            log::debug!("kernel feature {}: {} ({})", self.describe(), if p.have { "yes" } else { "no" }, p.seen);
            p
        })
    }

    pub fn have(self) -> bool {
        self.probe().have
    }

    /// Err naming the missing feature and what the probe saw, for an
    /// explicit choice (`mount_api=fd`) this kernel cannot honour.
    pub fn require(self, for_what: &str) -> Result<()> {
        let p = self.probe();
        if p.have {
            return Ok(());
        }
        Err(Error::Unsupported(format!(
            "{for_what} needs {}, which this kernel ({}) does not have ({})",
            self.describe(),
            release().unwrap_or_else(|_| "unknown".into()),
            p.seen
        )))
    }
}

/// Every feature, probed, for `-v` and `status`: "openat2 yes, ...".
pub fn summary() -> String {
    ALL.iter().map(|f| format!("{} {}", f.short(), if f.have() { "yes" } else { "no" })).collect::<Vec<_>>().join(", ")
}

fn probe_openat2() -> Probe {
    match rustix::fs::openat2(rustix::fs::CWD, "/", OFlags::PATH | OFlags::CLOEXEC, Mode::empty(), ResolveFlags::NO_SYMLINKS) {
        Ok(_) => Probe::yes("openat2 /"),
        Err(e) => Probe::no("openat2 /", e),
    }
}

fn probe_new_mount_api() -> Probe {
    match rustix::mount::fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC) {
        // Closing an unconfigured context creates nothing.
        Ok(_) => Probe::yes("fsopen tmpfs"),
        Err(e) => Probe::no("fsopen tmpfs", e),
    }
}

fn probe_loop_configure() -> Probe {
    match crate::kernel::loopdev::probe_configure() {
        Ok(true) => Probe::yes("LOOP_CONFIGURE with no backing file: EBADF"),
        Ok(false) => Probe { have: false, seen: "LOOP_CONFIGURE: unknown ioctl".into() },
        Err(e) => Probe::no("LOOP_CONFIGURE probe", e),
    }
}

/// overlayfs before 6.5 takes its options through the kernel's legacy
/// adapter, which accepts any key at fsconfig time (and fails only at
/// create): a key that cannot exist being accepted means lowerdir+ is
/// not understood either. From 6.5 unknown keys are EINVAL at once, so
/// lowerdir+ (6.8) is tried for real; layers by fd (6.13) likewise with
/// an fd of "/". Nothing is ever created: the contexts are just closed.
fn probe_overlay(by_fd: bool) -> Probe {
    if !Feature::NewMountApi.have() {
        return Probe { have: false, seen: format!("needs {}", Feature::NewMountApi.describe()) };
    }
    let open = || rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC);
    let ctx = match open() {
        Ok(c) => c,
        Err(e) => return Probe::no("fsopen overlay", e),
    };
    if rustix::mount::fsconfig_set_string(&ctx, "sharedloop-probe", "x").is_ok() {
        return Probe { have: false, seen: "overlayfs takes options through the legacy adapter (before 6.5)".into() };
    }
    let ctx = match open() {
        Ok(c) => c,
        Err(e) => return Probe::no("fsopen overlay", e),
    };
    if !by_fd {
        return match rustix::mount::fsconfig_set_string(&ctx, "lowerdir+", "/") {
            Ok(()) => Probe::yes("fsconfig lowerdir+ /"),
            Err(e) => Probe::no("fsconfig lowerdir+", e),
        };
    }
    let root = match rustix::fs::open("/", OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty()) {
        Ok(f) => f,
        Err(e) => return Probe::no("open /", e),
    };
    match rustix::mount::fsconfig_set_fd(&ctx, "lowerdir+", &root) {
        Ok(()) => Probe::yes("fsconfig lowerdir+ by fd"),
        Err(e) => Probe::no("fsconfig lowerdir+ by fd", e),
    }
}

/// erofs given a regular file as its source: a kernel that mounts image
/// files opens it and finds no erofs superblock (EINVAL); one that does
/// not looks for a block device and says ENOTBLK. Our own executable is
/// the file: certainly regular, certainly not erofs.
fn probe_erofs_file() -> Probe {
    if !Feature::NewMountApi.have() {
        return Probe { have: false, seen: format!("needs {}", Feature::NewMountApi.describe()) };
    }
    let ctx = match rustix::mount::fsopen("erofs", FsOpenFlags::FSOPEN_CLOEXEC) {
        Ok(c) => c,
        Err(e) => return Probe::no("fsopen erofs", e),
    };
    if let Err(e) = rustix::mount::fsconfig_set_string(&ctx, "source", "/proc/self/exe") {
        return Probe::no("fsconfig erofs source", e);
    }
    let _ = rustix::mount::fsconfig_set_flag(&ctx, "ro");
    match rustix::mount::fsconfig_create(&ctx) {
        Err(Errno::INVAL) => Probe::yes("erofs with a regular file as source: read it, no erofs superblock (EINVAL)"),
        Err(e) => Probe::no("erofs with a regular file as source", e),
        Ok(()) => Probe::yes("erofs with a regular file as source"),
    }
}

/// Does this kernel have erofs (built in, or a module it loads on
/// request)? Decides the default layer format. Asked of fsopen, which
/// loads the module as a mount would; without the new mount API, of
/// mount(2) with an empty source, which fails on the source (never
/// mounting anything) when the type is known and with ENODEV when not.
pub fn has_erofs() -> &'static Probe {
    static P: OnceLock<Probe> = OnceLock::new();
    P.get_or_init(|| {
        let p = match rustix::mount::fsopen("erofs", FsOpenFlags::FSOPEN_CLOEXEC) {
            Ok(_) => Probe::yes("fsopen erofs"),
            Err(Errno::NODEV) => Probe::no("fsopen erofs", Errno::NODEV),
            Err(e) if e == Errno::NOSYS || e == Errno::PERM => {
                // The target is a file no directory can be mounted over,
                // so that even a source that resolved could not attach.
                match rustix::mount::mount("", "/dev/null", "erofs", rustix::mount::MountFlags::RDONLY | rustix::mount::MountFlags::SILENT, None) {
                    Err(Errno::NODEV) => Probe::no("mount(2) erofs", Errno::NODEV),
                    Err(e2) => Probe::yes(format!("mount(2) erofs knows the type (empty source: {})", crate::error::Errno(e2))),
                    Ok(()) => Probe::yes("mount(2) erofs"),
                }
            }
            Err(e) => Probe::no("fsopen erofs", e),
        };
        log::debug!("kernel filesystem erofs: {} ({})", if p.have { "yes" } else { "no" }, p.seen);
        p
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_releases() {
        let cases = [
            ("6.18.44-fc-v669", Some(Version(6, 18, 44))),
            ("4.0.0", Some(Version(4, 0, 0))),
            ("4.0-rc1\n", Some(Version(4, 0, 0))),
            ("3.10.0-1160.el7.x86_64", Some(Version(3, 10, 0))),
            ("4.18.0-553.el8_10.x86_64", Some(Version(4, 18, 0))),
            ("5.8", Some(Version(5, 8, 0))),
            ("garbage", None),
            ("", None),
            ("6", None),
        ];
        for (s, want) in cases {
            assert_eq!(Version::parse(s), want, "{s:?}");
        }
        assert!(!Version(3, 10, 0).has_multi_lower());
    }
}
