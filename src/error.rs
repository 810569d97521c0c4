//! Typed errors. Every variant that comes from the system carries the path
//! (or the object) it concerns and the errno, so a message always says what
//! failed, where, and why.

use std::fmt;
use std::path::PathBuf;

/// util-linux mount(8) exit codes; helpers must use the same ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum ExitCode {
    Ok = 0,
    Usage = 1,
    System = 2,
    Internal = 4,
    Interrupted = 8,
    Utab = 16,
    MountFailure = 32,
}

/// An errno with its text, printed the way util-linux prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Errno(pub rustix::io::Errno);

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = std::io::Error::from_raw_os_error(self.0.raw_os_error());
        // std prints "No such file or directory (os error 2)": keep the text only.
        let s = e.to_string();
        let text = s.split(" (os error").next().unwrap_or(&s);
        f.write_str(text)
    }
}

impl From<rustix::io::Errno> for Errno {
    fn from(e: rustix::io::Errno) -> Self {
        Errno(e)
    }
}

impl Errno {
    pub fn from_io(e: &std::io::Error) -> Self {
        Errno(rustix::io::Errno::from_raw_os_error(
            e.raw_os_error().unwrap_or(libc::EIO),
        ))
    }
    pub fn raw(self) -> i32 {
        self.0.raw_os_error()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad command line or option string (exit 1).
    #[error("{0}")]
    Usage(String),

    /// A system call on a path failed.
    #[error("{what}: {}: {errno}", path.display())]
    Sys {
        what: String,
        path: PathBuf,
        errno: Errno,
    },

    /// The same, with a message the kernel logged on the fs_context fd.
    #[error("{what}: {}: {errno}{}", path.display(), kernel_msg(.kmsg))]
    Mount {
        what: String,
        path: PathBuf,
        errno: Errno,
        kmsg: Vec<String>,
    },

    /// Store content that is wrong: unknown IDs, broken chains, bad metadata.
    #[error("{0}")]
    Store(String),

    /// Neither store directory is there (a shared store not mounted, a
    /// mistyped path): not the same as an image missing from a store.
    #[error("no store: {}: {root_errno}; fallback {}: {fallback_errno}", root.display(), fallback.display())]
    NoStore {
        root: PathBuf,
        root_errno: Errno,
        fallback: PathBuf,
        fallback_errno: Errno,
    },

    /// A resource another mount holds (a read-write upper).
    #[error("{0}")]
    InUse(String),

    /// The mount point is not what the command needs: nothing mounted
    /// there, or not a sharedloop mount.
    #[error("{0}")]
    Target(String),

    /// An external command (mkfs) failed.
    #[error("{what}: {cmd} exited with {status}{}", if .stderr.is_empty() { String::new() } else { format!(": {}", .stderr) })]
    Command {
        what: String,
        cmd: String,
        status: String,
        stderr: String,
    },

    /// Writing /run/mount/utab failed (exit 16).
    #[error("utab: {}: {errno}{}", path.display(), if *.undone { "; the mount was undone" } else { "" })]
    Utab { path: PathBuf, errno: Errno, undone: bool },

    /// A signal asked us to stop; everything done so far was undone.
    #[error("interrupted by signal, every step undone")]
    Interrupted,

    /// What was asked for needs a kernel feature this kernel lacks (the
    /// message names the feature and what its probe saw).
    #[error("{0}")]
    Unsupported(String),

    /// A failure injected through SHAREDLOOP_FAILPOINT (tests only).
    #[error("injected failure at {0}")]
    Injected(String),

    /// Something that cannot happen did.
    #[error("internal error: {0}")]
    Internal(String),
}

fn kernel_msg(k: &[String]) -> String {
    if k.is_empty() {
        String::new()
    } else {
        format!(" (kernel: {})", k.join("; "))
    }
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn sys(what: impl Into<String>, path: impl Into<PathBuf>, errno: rustix::io::Errno) -> Self {
        Error::Sys {
            what: what.into(),
            path: path.into(),
            errno: Errno(errno),
        }
    }

    pub fn io(what: impl Into<String>, path: impl Into<PathBuf>, e: &std::io::Error) -> Self {
        Error::Sys {
            what: what.into(),
            path: path.into(),
            errno: Errno::from_io(e),
        }
    }

    /// The errno of a system error, for the root/fallback rule.
    pub fn errno(&self) -> Option<rustix::io::Errno> {
        match self {
            Error::Sys { errno, .. } | Error::Mount { errno, .. } | Error::Utab { errno, .. } => {
                Some(errno.0)
            }
            _ => None,
        }
    }

    /// Prefix the "what" of a system error with its context
    /// (for example the layer it concerns).
    pub fn context(self, ctx: &str) -> Self {
        match self {
            Error::Sys { what, path, errno } => Error::Sys {
                what: format!("{ctx}: {what}"),
                path,
                errno,
            },
            Error::Mount {
                what,
                path,
                errno,
                kmsg,
            } => Error::Mount {
                what: format!("{ctx}: {what}"),
                path,
                errno,
                kmsg,
            },
            Error::Store(m) => Error::Store(format!("{ctx}: {m}")),
            Error::Command {
                what,
                cmd,
                status,
                stderr,
            } => Error::Command {
                what: format!("{ctx}: {what}"),
                cmd,
                status,
                stderr,
            },
            other => other,
        }
    }

    /// Exit code for mount.sharedloop.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            Error::Usage(_) => ExitCode::Usage,
            Error::Utab { .. } => ExitCode::Utab,
            Error::Interrupted => ExitCode::Interrupted,
            Error::Internal(_) => ExitCode::Internal,
            Error::Sys { .. }
            | Error::Mount { .. }
            | Error::Store(_)
            | Error::NoStore { .. }
            | Error::InUse(_)
            | Error::Target(_)
            | Error::Command { .. }
            | Error::Unsupported(_)
            | Error::Injected(_) => ExitCode::MountFailure,
        }
    }
}
