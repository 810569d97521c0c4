//! /etc/sharedloop/sharedloop.conf: defaults so fstab lines stay short.
//!
//! The same options as `-o`, one or more per line (comma-separated), `#`
//! starts a comment. Only defaults are allowed (store directories,
//! upper_size, upper_fstype, direct_io, mount_api, loop_api, overlay
//! features, override_kernel_check). SHAREDLOOP_CONFIG names another file.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::mount::opts::{MountOptions, Origin};

pub const DEFAULT_PATH: &str = "/etc/sharedloop/sharedloop.conf";

/// The configuration file to read, or None for none: SHAREDLOOP_CONFIG
/// if set (empty: no file at all), else the default path.
pub fn path() -> Option<PathBuf> {
    match std::env::var_os("SHAREDLOOP_CONFIG") {
        Some(p) if p.is_empty() => None,
        Some(p) => Some(PathBuf::from(p)),
        None => Some(PathBuf::from(DEFAULT_PATH)),
    }
}

/// The option string a configuration file holds (bytes: a store path
/// need not be UTF-8).
pub fn to_option_string(text: &[u8]) -> Vec<u8> {
    text.split(|&b| b == b'\n')
        .map(|l| l.split(|&b| b == b'#').next().unwrap_or(b"").trim_ascii())
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(&b","[..])
}

/// The default file missing: no defaults. A file SHAREDLOOP_CONFIG names
/// missing (a typo would otherwise drop every default silently),
/// unreadable, not a regular file or invalid: an error naming it.
pub fn load() -> Result<(MountOptions, Vec<String>)> {
    let Some(p) = path() else { return Ok((MountOptions::default(), vec![])) };
    let named = std::env::var_os("SHAREDLOOP_CONFIG").is_some();
    let what = if named { "read configuration (SHAREDLOOP_CONFIG)" } else { "read configuration" };
    let text = match read_regular(&p, what) {
        Err(e) if e.errno() == Some(rustix::io::Errno::NOENT) && !named => return Ok((MountOptions::default(), vec![])),
        r => r?,
    };
    MountOptions::parse(&to_option_string(&text), Origin::Config, false)
        .map_err(|e| Error::Usage(format!("{}: {e}", p.display())))
}

/// A regular file's bytes (at most 1 MiB); opened without blocking, so
/// that a FIFO in its place is an error, not a hang at boot.
fn read_regular(p: &std::path::Path, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |e: std::io::Error| Error::io(what, p, &e);
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(p)
        .map_err(err)?;
    if !f.metadata().map_err(err)?.is_file() {
        return Err(Error::Usage(format!("{what}: {}: not a regular file", p.display())));
    }
    let mut text = Vec::new();
    f.by_ref().take(1 << 20).read_to_end(&mut text).map_err(err)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comments_and_lines() {
        let t = "# store on NFS\nloopback_root=/srv/store   # shared\n\n  upper_size=1G,direct_io=off\n";
        assert_eq!(to_option_string(t.as_bytes()), b"loopback_root=/srv/store,upper_size=1G,direct_io=off");
        assert_eq!(to_option_string(b"# only comments\n"), b"");
        assert_eq!(to_option_string(b"loopback_root=/s/\xff # x\n"), b"loopback_root=/s/\xff");
    }
}
