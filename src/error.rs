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

    /// What a store holds, or an image being imported, is not what it
    /// must be: unknown IDs, broken chains, damaged files, bad images.
    #[error(transparent)]
    Store(#[from] StoreError),

    /// An error with the object it concerns named in front (a layer, an
    /// import step), where the error itself has no `what` to prefix.
    #[error("{ctx}: {source}")]
    Context { ctx: String, source: Box<Error> },

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

/// What is asked of a store and is not there.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Missing {
    /// A layer by full chain ID.
    Layer,
    /// A name.
    Image,
    /// A layer by ID prefix.
    IdPrefix,
    /// The parent an `add` was given.
    Parent,
}

/// Store and image failures, by kind. Where a system call is behind one,
/// its errno is kept (`errno`), so a caller can still tell EIO from a
/// malformed file; `Error::errno` leaves these out on purpose, since the
/// root/fallback rule must not take damage for "not here".
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Neither store directory holds it. `searched` names both (and says
    /// which is missing).
    #[error("{}{id}: {} {searched}", missing_prefix(*.kind), missing_text(*.kind))]
    NotFound { kind: Missing, id: String, searched: String },

    /// An ID prefix that more than one layer has.
    #[error("layer sha256:{prefix}: ambiguous ID prefix, {} layers match: {}", .matches.len(), .matches.join(", "))]
    Ambiguous { prefix: String, matches: Vec<String> },

    /// A file of the store that is not what it must be: the wrong type or
    /// size, unreadable metadata, a name record that is not an ID.
    /// `of` says what kind of file it is where the path does not
    /// ("upper image "), empty for the store's own files.
    #[error("{of}{}: {why}", path.display())]
    Damaged { of: &'static str, path: PathBuf, why: String },

    /// A layer image whose superblock is not the format its metadata says
    /// (the kernel only said `source`, usually EINVAL).
    #[error("{source}; {}: {found}, its metadata says {expected} (image replaced? `sharedloop verify` checks the store)", path.display())]
    WrongFormat { path: PathBuf, found: String, expected: String, source: Box<Error> },

    /// A chain whose parents loop.
    #[error("chain of {top}: parent cycle at {at}")]
    Cycle { top: String, at: String },

    /// A chain longer than overlayfs can stack.
    #[error("chain of {top}: more than {max} layers, overlayfs takes at most {max}")]
    TooLong { top: String, max: usize },

    /// A parent below the top that cannot be opened.
    #[error("chain of {top} is broken: {source}")]
    Broken { top: String, source: Box<Error> },

    /// A layer removed (rm, gc) while it was being used.
    #[error("{what}: {source}")]
    Vanished { what: String, source: Box<Error> },

    /// Both store directories failed, for different reasons.
    #[error("{root}; fallback: {fallback}")]
    BothFailed { root: Box<Error>, fallback: Box<Error> },

    /// The store could not be read completely, so what is referenced
    /// cannot be told (removal refuses then).
    #[error("{what}: cannot tell which layers are referenced, the store could not be read completely: {}", .problems.join("; "))]
    Incomplete { what: String, problems: Vec<String> },

    /// `verify` found problems (each printed already).
    #[error("verify: {failed} of {checked} checks failed")]
    VerifyFailed { failed: usize, checked: usize },

    /// Content whose digest or size is not the one it is named by:
    /// `want` and `got` say what each side says ("the config says ...").
    #[error("{}{which} mismatch: {}", prefix(.what), [.want.as_str(), .got.as_str()].iter().filter(|s| !s.is_empty()).copied().collect::<Vec<_>>().join(", "))]
    Mismatch { what: String, which: &'static str, want: String, got: String },

    /// A layer entry that asks for something never done: a path outside
    /// the tree, a link through a symlink, a whiteout with a bad name.
    #[error("refusing {what}: {why}")]
    Refused { what: String, why: String },

    /// What an import reads is not a valid image, or a layer asks for
    /// something refused (a path outside the tree, a link through a
    /// symlink). `errno` when a read failed underneath.
    #[error("{what}: {why}")]
    BadImage { what: String, why: String, errno: Option<Errno> },
}

fn prefix(what: &str) -> String {
    if what.is_empty() { String::new() } else { format!("{what}: ") }
}

fn missing_prefix(k: Missing) -> &'static str {
    match k {
        Missing::Layer => "layer ",
        Missing::Image => "image ",
        Missing::IdPrefix => "layer sha256:",
        Missing::Parent => "parent ",
    }
}

fn missing_text(k: Missing) -> &'static str {
    match k {
        Missing::Layer | Missing::Parent => "not found in",
        Missing::Image => "no such name in",
        Missing::IdPrefix => "no layer with this ID prefix in",
    }
}

impl StoreError {
    /// The errno of the system call behind it, if one was.
    pub fn errno(&self) -> Option<rustix::io::Errno> {
        match self {
            StoreError::NotFound { .. } => Some(rustix::io::Errno::NOENT),
            StoreError::BadImage { errno, .. } => errno.map(|e| e.0),
            StoreError::WrongFormat { source, .. }
            | StoreError::Broken { source, .. }
            | StoreError::Vanished { source, .. } => source.errno().or_else(|| source.store().and_then(|s| s.errno())),
            StoreError::BothFailed { root, .. } => root.errno().or_else(|| root.store().and_then(|s| s.errno())),
            _ => None,
        }
    }
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

    /// A store error, looking through context.
    pub fn store(&self) -> Option<&StoreError> {
        match self {
            Error::Store(s) => Some(s),
            Error::Context { source, .. } => source.store(),
            _ => None,
        }
    }

    /// An image being imported that is not valid: `what` it is, `why`.
    pub fn bad_image(what: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Store(StoreError::BadImage { what: what.into(), why: why.into(), errno: None })
    }

    /// The same, when reading it failed: keeps the errno where there is one.
    pub fn bad_image_io(what: impl Into<String>, e: &std::io::Error) -> Self {
        let errno = e.raw_os_error().map(|n| Errno(rustix::io::Errno::from_raw_os_error(n)));
        // An errno prints as util-linux prints it; a decoder's error as it says.
        let why = errno.map(|n| n.to_string()).unwrap_or_else(|| e.to_string());
        Error::Store(StoreError::BadImage { what: what.into(), why, errno })
    }

    /// A layer entry refused: `what` it is, `why`.
    pub fn refused(what: impl Into<String>, why: impl Into<String>) -> Self {
        Error::Store(StoreError::Refused { what: what.into(), why: why.into() })
    }

    /// A file of the store that is not what it must be.
    pub fn damaged(path: impl Into<PathBuf>, why: impl Into<String>) -> Self {
        Error::Store(StoreError::Damaged { of: "", path: path.into(), why: why.into() })
    }

    /// An upper image that is not what it must be.
    pub fn damaged_upper(path: impl Into<PathBuf>, why: impl Into<String>) -> Self {
        Error::Store(StoreError::Damaged { of: "upper image ", path: path.into(), why: why.into() })
    }

    /// Neither store directory has it.
    pub fn not_found(kind: Missing, id: impl fmt::Display, searched: impl Into<String>) -> Self {
        Error::Store(StoreError::NotFound { kind, id: id.to_string(), searched: searched.into() })
    }

    /// Content that is not what its digest or size says.
    pub fn mismatch(what: impl Into<String>, which: &'static str, want: impl Into<String>, got: impl Into<String>) -> Self {
        Error::Store(StoreError::Mismatch { what: what.into(), which, want: want.into(), got: got.into() })
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
            Error::Store(StoreError::BadImage { what, why, errno }) => {
                Error::Store(StoreError::BadImage { what: format!("{ctx}: {what}"), why, errno })
            }
            e @ (Error::Store(_) | Error::Context { .. }) => Error::Context { ctx: ctx.to_string(), source: Box::new(e) },
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
            Error::Context { source, .. } => source.exit_code(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::io::Errno as E;

    /// Each kind prints what it concerns and why, the way the messages
    /// users (and scripts grepping them) know read; the errno behind it is
    /// kept apart from the text.
    #[test]
    fn store_errors_print_and_keep_errno() {
        let io = std::io::Error::from_raw_os_error(libc::EIO);
        let sys = || Box::new(Error::sys("open", "/s/layers/x/meta.json", E::IO));
        let cases: Vec<(Error, &str, Option<E>)> = vec![
            (Error::not_found(Missing::Layer, "sha256:ab", "/r nor /f"), "layer sha256:ab: not found in /r nor /f", Some(E::NOENT)),
            (Error::not_found(Missing::Image, "app:1", "/r nor /f"), "image app:1: no such name in /r nor /f", Some(E::NOENT)),
            (Error::not_found(Missing::IdPrefix, "abcd", "/r nor /f"), "layer sha256:abcd: no layer with this ID prefix in /r nor /f", Some(E::NOENT)),
            (Error::not_found(Missing::Parent, "sha256:cd", "/r nor /f"), "parent sha256:cd: not found in /r nor /f", Some(E::NOENT)),
            (
                Error::Store(StoreError::Ambiguous { prefix: "ab".into(), matches: vec!["sha256:ab1".into(), "sha256:ab2".into()] }),
                "layer sha256:ab: ambiguous ID prefix, 2 layers match: sha256:ab1, sha256:ab2",
                None,
            ),
            (Error::damaged("/s/names/a", "not UTF-8 text"), "/s/names/a: not UTF-8 text", None),
            (Error::damaged_upper("/dev/null", "not a regular file"), "upper image /dev/null: not a regular file", None),
            (Error::Store(StoreError::Cycle { top: "T".into(), at: "A".into() }), "chain of T: parent cycle at A", None),
            (Error::Store(StoreError::TooLong { top: "T".into(), max: 500 }), "chain of T: more than 500 layers, overlayfs takes at most 500", None),
            (
                Error::Store(StoreError::Broken { top: "T".into(), source: sys() }),
                "chain of T is broken: open: /s/layers/x/meta.json: Input/output error",
                Some(E::IO),
            ),
            (
                Error::Store(StoreError::BothFailed { root: sys(), fallback: Box::new(Error::damaged("/f/x", "corrupt metadata")) }),
                "open: /s/layers/x/meta.json: Input/output error; fallback: /f/x: corrupt metadata",
                Some(E::IO),
            ),
            (Error::mismatch("m", "digest", "expected sha256:1", "content has sha256:2"), "m: digest mismatch: expected sha256:1, content has sha256:2", None),
            (Error::mismatch("", "diff ID", "the config says A", "the layer has B"), "diff ID mismatch: the config says A, the layer has B", None),
            (Error::mismatch("blob X", "digest", "", "the blob read has Y"), "blob X: digest mismatch: the blob read has Y", None),
            (Error::refused("layer entry \"a\"", "bad whiteout name"), "refusing layer entry \"a\": bad whiteout name", None),
            (Error::bad_image_io("layer tar", &io), "layer tar: Input/output error", Some(E::IO)),
            (Error::bad_image("oci:/x", "index.json lists no image").context("import"), "import: oci:/x: index.json lists no image", None),
            (Error::damaged("/s/x", "bad").context("layer L"), "layer L: /s/x: bad", None),
        ];
        for (e, text, errno) in cases {
            assert_eq!(e.to_string(), text);
            assert_eq!(e.store().and_then(|s| s.errno()), errno, "{text}");
            assert_eq!(e.exit_code(), ExitCode::MountFailure, "{text}");
            // The root/fallback rule never sees a store error's errno.
            assert_eq!(e.errno(), None, "{text}");
        }
    }
}
