//! Image configs (the OCI/Docker config JSON: Env, Entrypoint, Cmd, ...)
//! kept beside the names that `import` records, for `bundle`.
//!
//! ```text
//! configs/sha256-<hex>.json      the config blob, verbatim, named by its sha256
//! confignames/<encoded name>     "sha256:<config digest>\n"
//! ```
//!
//! Both are new directories next to `names/`, whose records keep their
//! format: a sharedloop that predates them (another node of a shared
//! store) reads, mounts, removes and collects exactly as before and never
//! looks in here. What such a node can do is re-point or remove a name
//! without touching its config pointer; so a pointer is only believed when
//! the config's own diff IDs give the chain ID its name points to now
//! (`bundle`, `verify`), and `gc` removes pointers whose name is gone.
//! Both files are published like names: written to a dot-temporary in
//! the same directory, fsynced, renamed into place.

use std::path::Path;

use rustix::fs::{AtFlags, Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::store::ids::{Digest, Name};
use crate::store::{open_beneath, read_pointer_in, read_small, store_subdir, unique_suffix, write_pointer};

pub const CONFIGS: &str = "configs";
pub const CONFIGNAMES: &str = "confignames";
/// As import's limit on manifests and configs read into memory.
pub const CONFIG_MAX: u64 = 32 << 20;

/// `sha256-<hex>.json`
pub fn config_file(d: &Digest) -> String {
    format!("sha256-{}.json", d.hex())
}

/// The digest a `configs/` file name stands for, if it is one.
pub fn parse_config_file(name: &str) -> Option<Digest> {
    name.strip_prefix("sha256-").and_then(|r| r.strip_suffix(".json")).and_then(Digest::from_hex)
}

pub fn digest_of(data: &[u8]) -> Digest {
    Digest::of_bytes(data)
}

/// Store the config blob in `dir` (a store directory); returns its digest.
/// A config already there (same digest, same bytes) is left as it is.
pub fn put_config(dir: &Path, data: &[u8]) -> Result<Digest> {
    if data.len() as u64 > CONFIG_MAX {
        return Err(Error::bad_image("image config", format!("{} bytes, more than the {CONFIG_MAX} kept", data.len())));
    }
    let d = digest_of(data);
    let file = config_file(&d);
    let configs = store_subdir(dir, CONFIGS, 0o755)?;
    if read_config_in(dir, &d).is_ok() {
        // Made young again: a `gc` that finds it unreferenced (its old
        // name removed) must not take it before our pointer is written.
        let now = rustix::fs::Timestamps {
            last_access: rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_OMIT },
            last_modification: rustix::fs::Timespec { tv_sec: 0, tv_nsec: rustix::fs::UTIME_NOW },
        };
        rustix::fs::utimensat(&configs, file.as_str(), &now, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| Error::sys("touch image config", dir.join(CONFIGS).join(&file), e))?;
        return Ok(d);
    }
    let tmp = format!(".{file}.{}.{}", std::process::id(), unique_suffix());
    let tmp_path = dir.join(CONFIGS).join(&tmp);
    let fd = rustix::fs::openat(
        &configs,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o644),
    )
    .map_err(|e| Error::sys("create", &tmp_path, e))?;
    let mut rest = data;
    let written = loop {
        if rest.is_empty() {
            break rustix::fs::fsync(&fd);
        }
        match rustix::io::write(&fd, rest) {
            Ok(0) => break Err(Errno::NOSPC),
            Ok(n) => rest = &rest[n..],
            Err(Errno::INTR) => {}
            Err(e) => break Err(e),
        }
    };
    drop(fd);
    // Content-addressed: a rename over a copy another writer put there
    // meanwhile replaces it with the same bytes.
    let r = written
        .map_err(|e| Error::sys("write", &tmp_path, e))
        .and_then(|()| {
            rustix::fs::renameat(&configs, tmp.as_str(), &configs, file.as_str())
                .map_err(|e| Error::sys("publish image config", dir.join(CONFIGS).join(&file), e))
        });
    let _ = rustix::fs::unlinkat(&configs, tmp.as_str(), AtFlags::empty());
    r.map(|()| d)
}

/// The config blob `d` of store directory `dir`, checked against its digest.
pub fn read_config_in(dir: &Path, d: &Digest) -> Result<Vec<u8>> {
    let rel = format!("{CONFIGS}/{}", config_file(d));
    let path = dir.join(&rel);
    // Written by another node a moment ago, a shared filesystem's client
    // may answer from a stale handle (GlusterFS: ESTALE on the stat): look
    // again, as for names and metadata.
    let text = crate::store::retry_stale(|| {
        let fd = open_beneath(dir, &rel, OFlags::RDONLY | OFlags::NONBLOCK, Mode::empty())?;
        read_small(fd, &path, CONFIG_MAX + 1)
    })?;
    if text.len() as u64 > CONFIG_MAX {
        return Err(Error::damaged(path, format!("more than {CONFIG_MAX} bytes, not an image config")));
    }
    let got = digest_of(text.as_bytes());
    if got != *d {
        return Err(Error::mismatch(path.display().to_string(), "digest", "", format!("content has {got} (damaged store?)")));
    }
    Ok(text.into_bytes())
}

/// Point `confignames/<name>` at config `d`.
pub fn name_config(dir: &Path, name: &Name, d: &Digest) -> Result<()> {
    write_pointer(dir, CONFIGNAMES, name, d)
}

/// The config digest `name` has in `dir`, None if it has no record.
pub fn read_config_name_in(dir: &Path, name: &Name) -> Result<Option<Digest>> {
    match read_pointer_in(dir, CONFIGNAMES, name) {
        Ok(d) => Ok(Some(d)),
        Err(e) if e.errno() == Some(Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Remove `confignames/<name>` of `dir`, if there.
pub fn forget_config_name(dir: &Path, name: &Name) -> Result<()> {
    let sub = match open_beneath(dir, CONFIGNAMES, OFlags::PATH | OFlags::DIRECTORY, Mode::empty()) {
        Ok(fd) => fd,
        Err(e) if e.errno() == Some(Errno::NOENT) => return Ok(()),
        Err(e) => return Err(e),
    };
    match rustix::fs::unlinkat(&sub, name.file_name(), AtFlags::empty()) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(e) => Err(Error::sys(format!("image config of {name}: remove"), dir.join(CONFIGNAMES).join(name.file_name()), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tmp(std::path::PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn configs_round_trip_and_refuse_damage() {
        let t = Tmp(std::env::temp_dir().join(format!("sl-configs-{}", std::process::id())));
        std::fs::create_dir_all(&t.0).unwrap();
        let data = br#"{"config":{"Env":["A=1"]},"rootfs":{"type":"layers","diff_ids":[]}}"#;
        let d = put_config(&t.0, data).unwrap();
        assert_eq!(d, digest_of(data));
        let f = t.0.join(CONFIGS).join(config_file(&d));
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::options().write(true).open(&f).unwrap().set_modified(old).unwrap();
        assert_eq!(put_config(&t.0, data).unwrap(), d, "a second put keeps the first");
        let m = std::fs::metadata(&f).unwrap().modified().unwrap();
        assert!(m > old + std::time::Duration::from_secs(86400 * 365 * 20), "a second put makes it young again: {m:?}");
        assert_eq!(read_config_in(&t.0, &d).unwrap(), data);
        assert_eq!(std::fs::read_dir(t.0.join(CONFIGS)).unwrap().count(), 1, "no temporary left");
        let n = Name::parse("img:1").unwrap();
        assert_eq!(read_config_name_in(&t.0, &n).unwrap(), None);
        name_config(&t.0, &n, &d).unwrap();
        assert_eq!(read_config_name_in(&t.0, &n).unwrap(), Some(d));
        // A changed blob is refused, naming the file.
        std::fs::write(&f, b"{}").unwrap();
        let e = read_config_in(&t.0, &d).unwrap_err().to_string();
        assert!(e.contains("digest mismatch") && e.contains(&config_file(&d)), "{e}");
        forget_config_name(&t.0, &n).unwrap();
        forget_config_name(&t.0, &n).unwrap();
        assert_eq!(read_config_name_in(&t.0, &n).unwrap(), None);
        assert_eq!(parse_config_file(&config_file(&d)), Some(d));
        for bad in ["sha256-xyz.json", ".sha256-00.json.1.2", "other"] {
            assert_eq!(parse_config_file(bad), None, "{bad}");
        }
    }
}
