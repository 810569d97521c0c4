//! /etc/sharedloop/sharedloop.conf: defaults so fstab lines stay short.
//!
//! The same options as `-o`, one or more per line (comma-separated), `#`
//! starts a comment. Only defaults are allowed (store directories,
//! upper_size, upper_fstype, direct_io, mount_api, loop_api, overlay
//! features, override_kernel_check). SHAREDLOOP_CONFIG names another file.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::opts::{MountOptions, Origin};

pub const DEFAULT_PATH: &str = "/etc/sharedloop/sharedloop.conf";

pub fn path() -> PathBuf {
    std::env::var_os("SHAREDLOOP_CONFIG").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
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

/// Missing file: no defaults. Unreadable or invalid: an error naming it.
pub fn load() -> Result<(MountOptions, Vec<String>)> {
    let p = path();
    let text = match std::fs::read(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((MountOptions::default(), vec![])),
        Err(e) => return Err(Error::io("read configuration", &p, &e)),
    };
    MountOptions::parse(&to_option_string(&text), Origin::Config, false)
        .map_err(|e| Error::Usage(format!("{}: {e}", p.display())))
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
