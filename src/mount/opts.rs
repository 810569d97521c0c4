//! The fstab-style option string (`-o`) and the configuration file, parsed
//! into `MountOptions`. Pure code: no I/O.
//!
//! Syntax as util-linux has it: comma-separated `key` or `key=value`; a
//! value may be double-quoted to hold commas (`loopback_root="/a,b"`).

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{Error, Result};
use crate::store::ids::{LayerRef, Name};
use crate::store::FsType;

pub const DEFAULT_UPPER_SIZE: u64 = 10 << 30;

/// Where the writable layer comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UpperSpec {
    /// `uppers/<name>.img` in the store, created on first use.
    Named(Name),
    /// An image file anywhere, created on first use.
    Path(PathBuf),
    /// A throw-away tmpfs, gone at umount.
    Tmpfs,
}

impl std::fmt::Display for UpperSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            UpperSpec::Named(n) => write!(f, "{n} (in the store)"),
            UpperSpec::Path(p) => write!(f, "{}", p.display()),
            UpperSpec::Tmpfs => f.write_str("tmpfs"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MountApi {
    Auto,
    /// fsopen + `lowerdir+` with each layer a detached mount fd (6.13+).
    Fd,
    /// fsopen + `lowerdir+` with paths to layer mounts in a private dir (6.8+).
    Path,
    /// mount(2) with relative lower paths, length checked (any kernel).
    Legacy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoopApi {
    Auto,
    Configure,
    SetFd,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Atime {
    Relatime,
    Noatime,
    Strictatime,
}

/// The generic VFS flags; `None` means "not said".
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Flags {
    pub ro: Option<bool>,
    pub nosuid: Option<bool>,
    pub nodev: Option<bool>,
    pub noexec: Option<bool>,
    pub nosymfollow: Option<bool>,
    pub atime: Option<Atime>,
    pub nodiratime: Option<bool>,
    pub sync: Option<bool>,
    pub dirsync: Option<bool>,
    pub lazytime: Option<bool>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountOptions {
    pub loopback_root: Option<PathBuf>,
    pub loopback_fallback: Option<PathBuf>,
    pub override_kernel_check: bool,
    pub layers: Option<Vec<LayerRef>>,
    /// `Some(None)`: `upper=none` said explicitly (read-only).
    pub upper: Option<Option<UpperSpec>>,
    pub upper_size: Option<u64>,
    pub upper_fstype: Option<FsType>,
    /// ext4 multi-mount protection on a new upper image.
    pub upper_mmp: Option<Mmp>,
    /// How a new upper image's space is taken from the store.
    pub upper_alloc: Option<Alloc>,
    pub direct_io: Option<bool>,
    pub mount_api: Option<MountApi>,
    pub loop_api: Option<LoopApi>,
    /// overlayfs options passed through, values already validated.
    pub overlay: Vec<(String, Option<String>)>,
    pub flags: Flags,
    /// Options mount(8) keeps for itself (`_netdev`, `nofail`, `x-*`...):
    /// accepted, recorded in utab, not acted on.
    pub userspace: Vec<OsString>,
    /// Node-local staging of `sharedloop add` and `import` (configuration
    /// file only: not a mount option).
    pub staging_dir: Option<PathBuf>,
    /// `layer_fstype=` (configuration file only): the format `add` and
    /// `import` write by default; `Some(None)` is auto.
    pub layer_fstype: Option<Option<FsType>>,
    /// `layer_compression=` (configuration file only): whether `add` and
    /// `import` LZ4-compress erofs layers by default.
    pub layer_compression: Option<bool>,
}

/// ext4 multi-mount protection (MMP) for a new upper image: the kernel
/// then refuses a second read-write mount of the image on any node, by
/// what is written in the image itself, even when the shared filesystem's
/// lock service has lost or never had our lock.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mmp {
    /// On where the upper is created on shared storage (see `sharedfs`).
    #[default]
    Auto,
    On,
    Off,
}

/// How a new upper image gets its space.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Alloc {
    /// Reserved in full when the image is made (fallocate): the upper can
    /// always hold `upper_size`, and a store without the room refuses the
    /// mount then, not a write later.
    #[default]
    Full,
    /// Sparse: blocks are taken as they are written, so the store may run
    /// out under a mounted upper (its writes then fail with EIO/ENOSPC).
    Sparse,
}

/// Where an option string comes from: the config file takes only defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    CommandLine,
    Config,
}

/// One item of an option string: its key and value as given (bytes).
pub type RawOption = (Vec<u8>, Option<Vec<u8>>);

/// Split an option string on commas outside double quotes; strip the
/// quotes. Bytes in, bytes out: a value may be a path that is not UTF-8.
pub fn split_options(s: &[u8]) -> Result<Vec<RawOption>> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut in_q = false;
    let push = |cur: &mut Vec<u8>, out: &mut Vec<RawOption>| {
        if !cur.is_empty() {
            let item = std::mem::take(cur);
            match item.iter().position(|&b| b == b'=') {
                Some(i) => out.push((item[..i].to_vec(), Some(item[i + 1..].to_vec()))),
                None => out.push((item, None)),
            }
        }
    };
    for &c in s {
        match c {
            b'"' => in_q = !in_q,
            b',' if !in_q => push(&mut cur, &mut out),
            _ => cur.push(c),
        }
    }
    if in_q {
        return Err(Error::Usage(format!("option string {:?}: unbalanced double quote", OsStr::from_bytes(s))));
    }
    push(&mut cur, &mut out);
    Ok(out)
}

/// `layers=` is ':'-separated like lowerdir, and each element may carry a
/// `sha256:` prefix of its own.
fn split_layer_list(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = list.split(':');
    while let Some(t) = it.next() {
        if t == "sha256" {
            out.push(format!("sha256:{}", it.next().unwrap_or("")));
        } else {
            out.push(t.to_string());
        }
    }
    out
}

fn abs_path(key: &str, v: &[u8]) -> Result<PathBuf> {
    let p = Path::new(OsStr::from_bytes(v));
    let shown = p.display();
    if !p.is_absolute() {
        return Err(Error::Usage(format!("{key}={shown}: must be an absolute path")));
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(Error::Usage(format!("{key}={shown}: '..' is not allowed")));
    }
    Ok(p.to_path_buf())
}

/// A value that must be a non-empty byte string (paths).
fn need_bytes<'a>(key: &str, v: Option<&'a [u8]>) -> Result<&'a [u8]> {
    match v {
        Some(x) if !x.is_empty() => Ok(x),
        _ => Err(Error::Usage(format!("{key}: needs a value"))),
    }
}

/// Options whose value is taken as bytes (a path, or mount(8)'s own
/// options, which go to utab as they are); every other value must be text.
fn takes_bytes(key: &str) -> bool {
    matches!(key, "loopback_root" | "loopback_fallback" | "staging_dir" | "upper") || is_userspace(key)
}

/// "10G", "512M", "1048576", "64k" (powers of 1024).
pub fn parse_size(key: &str, v: &str) -> Result<u64> {
    let bad = || Error::Usage(format!("{key}={v}: not a size (digits with an optional K, M, G or T)"));
    let v2 = v.trim();
    let (digits, mult) = match v2.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(bad()),
            };
            (&v2[..i], m)
        }
        _ => (v2, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits.parse().map_err(|_| bad())?;
    n.checked_mul(mult).filter(|&s| s > 0).ok_or_else(bad)
}

fn on_off(key: &str, v: Option<&str>) -> Result<bool> {
    match v {
        Some("on") | Some("1") | Some("yes") | None => Ok(true),
        Some("off") | Some("0") | Some("no") => Ok(false),
        Some(x) => Err(Error::Usage(format!("{key}={x}: want on or off"))),
    }
}

fn one_of(key: &str, v: Option<&str>, allowed: &[&str]) -> Result<String> {
    match v {
        Some(x) if allowed.contains(&x) => Ok(x.to_string()),
        Some(x) => Err(Error::Usage(format!("{key}={x}: want one of {}", allowed.join(", ")))),
        None => Err(Error::Usage(format!("{key}: needs a value ({})", allowed.join(", ")))),
    }
}

fn need<'a>(key: &str, v: Option<&'a str>) -> Result<&'a str> {
    match v {
        Some(x) if !x.is_empty() => Ok(x),
        _ => Err(Error::Usage(format!("{key}: needs a value"))),
    }
}

fn no_value(key: &str, v: Option<&str>) -> Result<()> {
    match v {
        None => Ok(()),
        Some(_) => Err(Error::Usage(format!("{key}: takes no value"))),
    }
}

/// mount(8)'s own options: it acts on them, or stores them in utab.
fn is_userspace(key: &str) -> bool {
    matches!(
        key,
        "_netdev" | "nofail" | "user" | "users" | "owner" | "group" | "noauto" | "auto" | "defaults" | "helper" | "comment" | "nouser"
    ) || key.starts_with("x-")
}

impl MountOptions {
    /// Parse an option string. Unknown options are an error naming them;
    /// with `sloppy` they are returned as warnings instead.
    pub fn parse(s: &[u8], origin: Origin, sloppy: bool) -> Result<(MountOptions, Vec<String>)> {
        let mut o = MountOptions::default();
        let mut warnings = Vec::new();
        for (raw_key, val) in split_options(s)? {
            let raw = val.as_deref();
            // The item as given, for messages.
            let shown = || {
                let mut b = raw_key.clone();
                if let Some(v) = raw {
                    b.push(b'=');
                    b.extend_from_slice(v);
                }
                format!("{:?}", OsStr::from_bytes(&b))
            };
            let Ok(key) = String::from_utf8(raw_key.clone()) else {
                if sloppy {
                    warnings.push(format!("ignoring unknown option {}", shown()));
                    continue;
                }
                return Err(Error::Usage(format!("unknown option {}", shown())));
            };
            let v: Option<&str> = match raw.map(std::str::from_utf8) {
                None => None,
                Some(Ok(t)) => Some(t),
                Some(Err(_)) if takes_bytes(&key) => None, // read from `raw` below
                Some(Err(_)) => {
                    return Err(Error::Usage(format!("{}: the value is not valid UTF-8", shown())));
                }
            };
            let config_ok = matches!(
                key.as_str(),
                "loopback_root"
                    | "loopback_fallback"
                    | "override_kernel_check"
                    | "upper_size"
                    | "upper_fstype"
                    | "upper_mmp"
                    | "upper_alloc"
                    | "direct_io"
                    | "mount_api"
                    | "loop_api"
                    | "metacopy"
                    | "redirect_dir"
                    | "index"
                    | "xino"
                    | "staging_dir"
                    | "layer_fstype"
                    | "layer_compression"
            );
            if origin == Origin::Config && !config_ok {
                return Err(Error::Usage(format!(
                    "{key}: not allowed in the configuration file (only defaults such as loopback_root, upper_size, direct_io)"
                )));
            }
            // For `sharedloop add` and `import` only, which take it from the
            // configuration file (or --staging-dir); mount has no use for it.
            if key == "staging_dir" || key == "layer_fstype" || key == "layer_compression" {
                if origin == Origin::Config && key == "layer_compression" {
                    o.layer_compression =
                        Some(crate::store::parse_layer_compression(need(&key, v)?).map_err(|_| {
                            Error::Usage(format!("layer_compression={}: want none or lz4", v.unwrap_or("")))
                        })?);
                } else if origin == Origin::Config && key == "layer_fstype" {
                    o.layer_fstype = Some(crate::store::parse_layer_fstype(need(&key, v)?).map_err(|_| {
                        Error::Usage(format!("layer_fstype={}: want ext4, xfs, erofs or auto", v.unwrap_or("")))
                    })?);
                } else if origin == Origin::Config {
                    o.staging_dir = Some(abs_path(&key, need_bytes(&key, raw)?)?);
                } else if sloppy {
                    warnings.push(format!("ignoring {key}: not a mount option (configuration file only)"));
                } else {
                    return Err(Error::Usage(format!(
                        "{key}: not a mount option (configuration file only; sharedloop add and import take --{})",
                        key.replace('_', "-").replace("layer-fstype", "fstype")
                    )));
                }
                continue;
            }
            match key.as_str() {
                "loopback_root" => o.loopback_root = Some(abs_path(&key, need_bytes(&key, raw)?)?),
                "loopback_fallback" => o.loopback_fallback = Some(abs_path(&key, need_bytes(&key, raw)?)?),
                "override_kernel_check" => {
                    no_value(&key, v)?;
                    o.override_kernel_check = true
                }
                "layers" => {
                    let list = need(&key, v)?;
                    let refs = split_layer_list(list)
                        .iter()
                        .map(|s| LayerRef::parse_id(s))
                        .collect::<Result<Vec<_>>>()
                        .map_err(|e| Error::Usage(format!("layers=: {e}")))?;
                    o.layers = Some(refs);
                }
                "upper" => {
                    let u = need_bytes(&key, raw)?;
                    o.upper = Some(match u {
                        b"none" => None,
                        b"tmpfs" => Some(UpperSpec::Tmpfs),
                        p if p.starts_with(b"/") => {
                            let path = abs_path(&key, p)?;
                            if p.ends_with(b"/") {
                                return Err(Error::Usage(format!("upper={}: names a directory, want an image file", path.display())));
                            }
                            Some(UpperSpec::Path(path))
                        }
                        n => {
                            let n = std::str::from_utf8(n)
                                .map_err(|_| Error::Usage(format!("{}: invalid name (not UTF-8)", shown())))?;
                            Some(UpperSpec::Named(Name::parse(n).map_err(|e| Error::Usage(format!("upper=: {e}")))?))
                        }
                    })
                }
                "upper_size" => o.upper_size = Some(parse_size(&key, need(&key, v)?)?),
                "upper_fstype" => {
                    o.upper_fstype = Some(match need(&key, v)? {
                        "ext4" => FsType::Ext4,
                        "xfs" => FsType::Xfs,
                        x => {
                            return Err(Error::Usage(format!("upper_fstype={x}: want ext4 or xfs")));
                        }
                    })
                }
                "upper_mmp" => {
                    o.upper_mmp = Some(match one_of(&key, v, &["auto", "on", "off"])?.as_str() {
                        "on" => Mmp::On,
                        "off" => Mmp::Off,
                        _ => Mmp::Auto,
                    })
                }
                "upper_alloc" => {
                    o.upper_alloc = Some(match one_of(&key, v, &["full", "sparse"])?.as_str() {
                        "sparse" => Alloc::Sparse,
                        _ => Alloc::Full,
                    })
                }
                "direct_io" => o.direct_io = Some(on_off(&key, v)?),
                "mount_api" => {
                    o.mount_api = Some(match one_of(&key, v, &["auto", "fd", "path", "legacy"])?.as_str() {
                        "fd" => MountApi::Fd,
                        "path" => MountApi::Path,
                        "legacy" => MountApi::Legacy,
                        _ => MountApi::Auto,
                    })
                }
                "loop_api" => {
                    o.loop_api = Some(match one_of(&key, v, &["auto", "configure", "setfd"])?.as_str() {
                        "configure" => LoopApi::Configure,
                        "setfd" => LoopApi::SetFd,
                        _ => LoopApi::Auto,
                    })
                }
                "metacopy" | "index" | "nfs_export" => {
                    let x = one_of(&key, v, &["on", "off"])?;
                    o.set_overlay(&key, Some(x));
                }
                "redirect_dir" => {
                    let x = one_of(&key, v, &["on", "off", "follow", "nofollow"])?;
                    o.set_overlay(&key, Some(x));
                }
                "xino" => {
                    let x = one_of(&key, v, &["on", "off", "auto"])?;
                    o.set_overlay(&key, Some(x));
                }
                "volatile" => {
                    no_value(&key, v)?;
                    o.set_overlay(&key, None);
                }
                "ro" | "rw" => {
                    no_value(&key, v)?;
                    o.flags.ro = Some(key == "ro")
                }
                "nosuid" | "suid" => {
                    no_value(&key, v)?;
                    o.flags.nosuid = Some(key == "nosuid")
                }
                "nodev" | "dev" => {
                    no_value(&key, v)?;
                    o.flags.nodev = Some(key == "nodev")
                }
                "noexec" | "exec" => {
                    no_value(&key, v)?;
                    o.flags.noexec = Some(key == "noexec")
                }
                "nosymfollow" | "symfollow" => {
                    no_value(&key, v)?;
                    o.flags.nosymfollow = Some(key == "nosymfollow")
                }
                "noatime" | "atime" | "relatime" | "norelatime" | "strictatime" | "nostrictatime" => {
                    no_value(&key, v)?;
                    o.flags.atime = Some(match key.as_str() {
                        "noatime" => Atime::Noatime,
                        "strictatime" | "norelatime" | "atime" => Atime::Strictatime,
                        _ => Atime::Relatime,
                    })
                }
                "nodiratime" | "diratime" => {
                    no_value(&key, v)?;
                    o.flags.nodiratime = Some(key == "nodiratime")
                }
                "sync" | "async" => {
                    no_value(&key, v)?;
                    o.flags.sync = Some(key == "sync")
                }
                "dirsync" => {
                    no_value(&key, v)?;
                    o.flags.dirsync = Some(true)
                }
                "lazytime" | "nolazytime" => {
                    no_value(&key, v)?;
                    o.flags.lazytime = Some(key == "lazytime")
                }
                k if is_userspace(k) => {
                    let mut b = raw_key.clone();
                    if let Some(v) = raw {
                        b.push(b'=');
                        b.extend_from_slice(v);
                    }
                    o.userspace.push(OsString::from_vec(b));
                }
                _ => {
                    if sloppy {
                        warnings.push(format!("ignoring unknown option {}", shown()));
                    } else {
                        return Err(Error::Usage(format!("unknown option {}", shown())));
                    }
                }
            }
        }
        Ok((o, warnings))
    }

    fn set_overlay(&mut self, key: &str, v: Option<String>) {
        self.overlay.retain(|(k, _)| k != key);
        self.overlay.push((key.to_string(), v));
    }

    /// `self` over `defaults`: what the command line says wins.
    pub fn over(self, defaults: MountOptions) -> MountOptions {
        let mut overlay = defaults.overlay;
        for (k, v) in self.overlay {
            overlay.retain(|(dk, _)| *dk != k);
            overlay.push((k, v));
        }
        MountOptions {
            loopback_root: self.loopback_root.or(defaults.loopback_root),
            loopback_fallback: self.loopback_fallback.or(defaults.loopback_fallback),
            override_kernel_check: self.override_kernel_check || defaults.override_kernel_check,
            layers: self.layers,
            upper: self.upper,
            upper_size: self.upper_size.or(defaults.upper_size),
            upper_fstype: self.upper_fstype.or(defaults.upper_fstype),
            upper_mmp: self.upper_mmp.or(defaults.upper_mmp),
            upper_alloc: self.upper_alloc.or(defaults.upper_alloc),
            direct_io: self.direct_io.or(defaults.direct_io),
            mount_api: self.mount_api.or(defaults.mount_api),
            loop_api: self.loop_api.or(defaults.loop_api),
            overlay,
            flags: self.flags,
            userspace: self.userspace,
            staging_dir: self.staging_dir.or(defaults.staging_dir),
            layer_fstype: self.layer_fstype.or(defaults.layer_fstype),
            layer_compression: self.layer_compression.or(defaults.layer_compression),
        }
    }

    /// Checks across options, after merging.
    pub fn check(&self) -> Result<()> {
        let upper = self.upper.clone().flatten();
        if upper.is_none() && self.overlay.iter().any(|(k, _)| k == "volatile") {
            return Err(Error::Usage("volatile: needs a writable upper (upper=)".into()));
        }
        if upper.is_some() && self.flags.ro == Some(true) {
            // Allowed: the overlay is mounted read-only, the upper still locked
            // so nobody else writes it meanwhile.
        }
        if matches!(upper, Some(UpperSpec::Tmpfs)) && self.upper_fstype.is_some() {
            return Err(Error::Usage("upper_fstype: not used with upper=tmpfs".into()));
        }
        if matches!(upper, Some(UpperSpec::Tmpfs)) && self.upper_mmp.is_some() {
            return Err(Error::Usage("upper_mmp: not used with upper=tmpfs".into()));
        }
        if self.upper_mmp == Some(Mmp::On) && self.upper_fstype == Some(FsType::Xfs) {
            return Err(Error::Usage(
                "upper_mmp=on: xfs has no multi-mount protection (use upper_fstype=ext4)".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> std::result::Result<MountOptions, String> {
        MountOptions::parse(s.as_bytes(), Origin::CommandLine, false)
            .map(|(o, _)| o)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn split_handles_quotes() {
        let cases: &[(&str, Vec<(&str, Option<&str>)>)] = &[
            ("a,b=c", vec![("a", None), ("b", Some("c"))]),
            ("loopback_root=\"/x,y\",ro", vec![("loopback_root", Some("/x,y")), ("ro", None)]),
            (",,a,,", vec![("a", None)]),
            ("", vec![]),
            ("k=v=w", vec![("k", Some("v=w"))]),
        ];
        for (s, want) in cases {
            let got = split_options(s.as_bytes()).unwrap();
            let want: Vec<RawOption> = want.iter().map(|(k, v)| (k.as_bytes().to_vec(), v.map(|v| v.as_bytes().to_vec()))).collect();
            assert_eq!(got, want, "{s:?}");
        }
        assert!(split_options(b"a=\"b").is_err());
    }

    #[test]
    fn accepted_options() {
        let o = parse("loopback_root=/srv/store,loopback_fallback=/var/lib/sl,upper=work1,upper_size=2G,upper_fstype=xfs,direct_io=off,metacopy=on,redirect_dir=follow,index=off,xino=auto,volatile,ro,nosuid,nodev,noexec,noatime,override_kernel_check,mount_api=legacy,loop_api=setfd").unwrap();
        assert_eq!(o.loopback_root.as_deref(), Some(Path::new("/srv/store")));
        assert_eq!(o.loopback_fallback.as_deref(), Some(Path::new("/var/lib/sl")));
        assert_eq!(o.upper, Some(Some(UpperSpec::Named(Name::parse("work1").unwrap()))));
        assert_eq!(o.upper_size, Some(2 << 30));
        assert_eq!(o.upper_fstype, Some(FsType::Xfs));
        assert_eq!(o.direct_io, Some(false));
        assert_eq!(o.mount_api, Some(MountApi::Legacy));
        assert_eq!(o.loop_api, Some(LoopApi::SetFd));
        assert!(o.override_kernel_check);
        assert_eq!(
            o.overlay,
            vec![
                ("metacopy".into(), Some("on".into())),
                ("redirect_dir".into(), Some("follow".into())),
                ("index".into(), Some("off".into())),
                ("xino".into(), Some("auto".into())),
                ("volatile".into(), None)
            ]
        );
        assert_eq!(o.flags.ro, Some(true));
        assert_eq!(o.flags.nosuid, Some(true));
        assert_eq!(o.flags.nodev, Some(true));
        assert_eq!(o.flags.noexec, Some(true));
        assert_eq!(o.flags.atime, Some(Atime::Noatime));
    }

    #[test]
    fn upper_forms() {
        let cases: &[(&str, std::result::Result<Option<Option<UpperSpec>>, &str>)] = &[
            ("upper=tmpfs", Ok(Some(Some(UpperSpec::Tmpfs)))),
            ("upper=none", Ok(Some(None))),
            ("upper=/srv/u/a.img", Ok(Some(Some(UpperSpec::Path("/srv/u/a.img".into()))))),
            ("", Ok(None)),
            ("upper=../x", Err("invalid name")),
            ("upper=a/../../x", Err("invalid name")),
            ("upper=/srv/../etc/x.img", Err("'..' is not allowed")),
            ("upper=/srv/dir/", Err("names a directory")),
            ("upper=", Err("needs a value")),
            ("upper=a b", Err("not allowed")),
        ];
        for (s, want) in cases {
            let got = parse(s).map(|o| o.upper);
            match (want, &got) {
                (Ok(w), Ok(g)) => assert_eq!(g, w, "{s:?}"),
                (Err(frag), Err(msg)) => assert!(msg.contains(frag), "{s:?}: {msg}"),
                _ => panic!("{s:?}: got {got:?}"),
            }
        }
    }

    #[test]
    fn rejected_options() {
        let cases = [
            ("bogus", "unknown option \"bogus\""),
            ("bogus=1", "unknown option \"bogus=1\""),
            ("loopback_root=relative/dir", "must be an absolute path"),
            ("loopback_root=/a/../b", "'..' is not allowed"),
            ("loopback_root", "needs a value"),
            ("metacopy=maybe", "want one of on, off"),
            ("xino", "needs a value"),
            ("ro=1", "takes no value"),
            ("upper_size=10X", "not a size"),
            ("upper_size=0", "not a size"),
            ("upper_size=99999999999T", "not a size"),
            ("upper_fstype=btrfs", "want ext4 or xfs"),
            ("upper_mmp=yes", "want one of auto, on, off"),
            ("upper_mmp", "needs a value"),
            ("layers=abc", "at least 12 hex digits"),
            ("layers=debian:12", "a layer ID is sha256:"),
            ("mount_api=new", "want one of auto, fd, path, legacy"),
            ("override_kernel_check=yes", "takes no value"),
        ];
        for (s, frag) in cases {
            let e = parse(s).unwrap_err();
            assert!(e.contains(frag), "{s:?}: {e}");
        }
    }

    #[test]
    fn userspace_and_sloppy() {
        let o = parse("_netdev,nofail,x-systemd.requires-mounts-for=/srv,helper=sharedloop,user,comment=x").unwrap();
        assert_eq!(
            o.userspace,
            ["_netdev", "nofail", "x-systemd.requires-mounts-for=/srv", "helper=sharedloop", "user", "comment=x"].map(OsString::from).to_vec()
        );
        let (o, w) = MountOptions::parse(b"ro,bogus,also=1", Origin::CommandLine, true).unwrap();
        assert_eq!(o.flags.ro, Some(true));
        assert_eq!(w, vec!["ignoring unknown option \"bogus\"", "ignoring unknown option \"also=1\""]);
    }

    #[test]
    fn layers_list() {
        let a = "a".repeat(64);
        let want = vec![
            LayerRef::Id(crate::store::ids::Digest::from_hex(&a).unwrap()),
            LayerRef::Prefix("bbbbbbbbbbbbb".into()),
        ];
        assert_eq!(parse(&format!("layers=sha256:{a}:bbbbbbbbbbbbb")).unwrap().layers.unwrap(), want);
        assert_eq!(parse(&format!("layers={a}:sha256:bbbbbbbbbbbbb")).unwrap().layers.unwrap(), want);
        assert!(parse("layers=sha256:").is_err());
        assert!(parse(&format!("layers={a}::{a}")).is_err());
    }

    #[test]
    fn config_and_merge() {
        let (cfg, _) = MountOptions::parse(b"loopback_root=/srv/s,upper_size=1G,direct_io=off,metacopy=on", Origin::Config, false).unwrap();
        assert!(MountOptions::parse(b"upper=x", Origin::Config, false).is_err());
        assert!(MountOptions::parse(b"ro", Origin::Config, false).is_err());
        let cli = parse("upper_size=2G,metacopy=off").unwrap();
        let m = cli.over(cfg);
        assert_eq!(m.loopback_root.as_deref(), Some(Path::new("/srv/s")));
        assert_eq!(m.upper_size, Some(2 << 30));
        assert_eq!(m.direct_io, Some(false));
        assert_eq!(m.overlay, vec![("metacopy".to_string(), Some("off".to_string()))]);
    }

    #[test]
    fn layer_fstype_is_a_configuration_key_only() {
        let cfg = |s: &str| MountOptions::parse(s.as_bytes(), Origin::Config, false).map(|(o, _)| o.layer_fstype).map_err(|e| e.to_string());
        let cases: &[(&str, std::result::Result<Option<Option<FsType>>, &str>)] = &[
            ("layer_fstype=ext4", Ok(Some(Some(FsType::Ext4)))),
            ("layer_fstype=xfs", Ok(Some(Some(FsType::Xfs)))),
            ("layer_fstype=erofs", Ok(Some(Some(FsType::Erofs)))),
            ("layer_fstype=auto", Ok(Some(None))),
            ("loopback_root=/srv/s", Ok(None)),
            ("layer_fstype=btrfs", Err("layer_fstype=btrfs: want ext4, xfs, erofs or auto")),
            ("layer_fstype", Err("needs a value")),
        ];
        for (s, want) in cases {
            match (want, cfg(s)) {
                (Ok(w), Ok(g)) => assert_eq!(&g, w, "{s:?}"),
                (Err(frag), Err(msg)) => assert!(msg.contains(frag), "{s:?}: {msg}"),
                (_, got) => panic!("{s:?}: got {got:?}"),
            }
        }
        let e = parse("layer_fstype=ext4").unwrap_err();
        assert!(e.to_string().contains("not a mount option"), "{e}");
    }

    #[test]
    fn staging_dir_is_a_configuration_key_only() {
        let cfg = |s: &str| MountOptions::parse(s.as_bytes(), Origin::Config, false).map(|(o, _)| o.staging_dir).map_err(|e| e.to_string());
        let cases: &[(&str, std::result::Result<Option<&str>, &str>)] = &[
            ("staging_dir=/var/tmp/sl", Ok(Some("/var/tmp/sl"))),
            ("staging_dir=\"/scratch/a,b\"", Ok(Some("/scratch/a,b"))),
            ("loopback_root=/srv/s", Ok(None)),
            ("staging_dir=tmp", Err("must be an absolute path")),
            ("staging_dir=/a/../b", Err("'..' is not allowed")),
            ("staging_dir", Err("needs a value")),
            ("staging_dir=", Err("needs a value")),
        ];
        for (s, want) in cases {
            match (want, cfg(s)) {
                (Ok(w), Ok(g)) => assert_eq!(g.as_deref(), w.map(Path::new), "{s:?}"),
                (Err(frag), Err(msg)) => assert!(msg.contains(frag), "{s:?}: {msg}"),
                (_, got) => panic!("{s:?}: got {got:?}"),
            }
        }
        let e = parse("staging_dir=/var/tmp/sl").unwrap_err();
        assert!(e.contains("not a mount option"), "{e}");
        let (o, w) = MountOptions::parse(b"ro,staging_dir=/x", Origin::CommandLine, true).unwrap();
        assert_eq!((o.staging_dir, w.len()), (None, 1));
        let (c, _) = MountOptions::parse(b"staging_dir=/a", Origin::Config, false).unwrap();
        assert_eq!(parse("ro").unwrap().over(c).staging_dir.as_deref(), Some(Path::new("/a")));
    }

    #[test]
    fn values_are_bytes_where_they_may_be_paths() {
        let (o, _) = MountOptions::parse(b"loopback_root=/srv/caf\xe9,upper=/u/\xff.img,comment=\xfe,x-a=\xfd", Origin::CommandLine, false).unwrap();
        assert_eq!(o.loopback_root.unwrap().as_os_str().as_bytes(), b"/srv/caf\xe9");
        assert_eq!(o.upper, Some(Some(UpperSpec::Path(PathBuf::from(OsStr::from_bytes(b"/u/\xff.img"))))));
        assert_eq!(o.userspace, vec![OsString::from_vec(b"comment=\xfe".to_vec()), OsString::from_vec(b"x-a=\xfd".to_vec())]);
        // Text-valued options refuse bytes that are not UTF-8, and say which.
        let cases: &[(&[u8], &str)] = &[
            (b"upper_size=1\xffG", "\"upper_size=1\\xFFG\": the value is not valid UTF-8"),
            (b"upper=n\xff", "\"upper=n\\xFF\": invalid name (not UTF-8)"),
            (b"\xff", "unknown option \"\\xFF\""),
            (b"ro,b\xe9=1", "unknown option \"b\\xE9=1\""),
        ];
        for (s, want) in cases {
            let e = MountOptions::parse(s, Origin::CommandLine, false).unwrap_err().to_string();
            assert_eq!(e, *want, "{s:?}");
        }
        let (_, w) = MountOptions::parse(b"\xff,ro", Origin::CommandLine, true).unwrap();
        assert_eq!(w, vec!["ignoring unknown option \"\\xFF\"".to_string()]);
    }

    #[test]
    fn cross_checks() {
        assert!(parse("volatile").unwrap().check().is_err());
        assert!(parse("volatile,upper=tmpfs").unwrap().check().is_ok());
        assert!(parse("upper=tmpfs,upper_fstype=xfs").unwrap().check().is_err());
        assert!(parse("upper=tmpfs,upper_mmp=on").unwrap().check().is_err());
        assert!(parse("upper=u,upper_mmp=on,upper_fstype=xfs").unwrap().check().is_err());
        assert!(parse("upper=u,upper_mmp=auto,upper_fstype=xfs").unwrap().check().is_ok());
        for (s, want) in [("upper_mmp=on", Mmp::On), ("upper_mmp=off", Mmp::Off), ("upper_mmp=auto", Mmp::Auto)] {
            assert_eq!(parse(s).unwrap().upper_mmp, Some(want), "{s}");
        }
    }

    /// Property tests: any option string (bytes, not text) never panics
    /// the parser, a refusal has one of the documented exit codes, and
    /// values that may be paths or mount(8)'s own come back byte-exact.
    mod fuzz {
        use super::super::*;
        use crate::error::ExitCode;
        use proptest::prelude::*;

        use crate::proptest_config as config;

        const KEYS: &[&str] = &[
            "loopback_root", "loopback_fallback", "override_kernel_check", "layers", "upper", "upper_size", "upper_fstype",
            "upper_mmp", "upper_alloc", "direct_io", "mount_api", "loop_api", "metacopy", "index", "nfs_export", "redirect_dir",
            "xino", "volatile", "ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "nosymfollow", "noatime",
            "relatime", "strictatime", "nodiratime", "sync", "async", "dirsync", "lazytime", "staging_dir", "_netdev", "nofail",
            "user", "defaults", "helper", "comment", "x-systemd.automount", "x-", "bogus", "",
        ];
        const VALUES: &[&str] = &[
            "", "on", "off", "1", "no", "auto", "fd", "path", "legacy", "configure", "setfd", "follow", "full", "sparse",
            "ext4", "xfs", "erofs", "none", "tmpfs", "work1", "/srv/store", "/u/x.img", "/u/", "/a/../b", "rel/dir", "10G",
            "0", "18446744073709551615T", "1 K", "sha256:", "sha256:00", "a:b", "debian:12", "\"/x,y\"",
        ];

        /// A byte of an option string (never NUL): often one the
        /// splitter looks at.
        fn byte() -> impl Strategy<Value = u8> {
            prop_oneof![
                3 => prop::sample::select(&b",=\"/.:- _x"[..]),
                2 => b'a'..=b'z',
                2 => 0x80u8..=0xff,
                1 => 1u8..=0xff,
            ]
        }

        fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec(byte(), 0..max)
        }

        /// One item: a known key with a likely or random value, or noise.
        fn item() -> impl Strategy<Value = Vec<u8>> {
            let key = prop_oneof![3 => prop::sample::select(KEYS).prop_map(|k| k.as_bytes().to_vec()), 1 => bytes(8)];
            let val = prop::option::of(prop_oneof![
                2 => prop::sample::select(VALUES).prop_map(|v| v.as_bytes().to_vec()),
                1 => bytes(12),
            ]);
            prop_oneof![
                4 => (key, val).prop_map(|(mut k, v)| {
                    if let Some(v) = v {
                        k.push(b'=');
                        k.extend(v);
                    }
                    k
                }),
                1 => bytes(16),
            ]
        }

        fn option_string() -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec(item(), 0..6).prop_map(|v| v.join(&b","[..]))
        }

        fn documented(e: &Error) -> std::result::Result<(), TestCaseError> {
            let c = e.exit_code();
            prop_assert!(matches!(c, ExitCode::Usage | ExitCode::MountFailure), "exit {c:?} for {e:?}");
            prop_assert!(!e.to_string().is_empty());
            Ok(())
        }

        /// Path-like bytes: absolute, no '"' (the quote is syntax), no ".."
        /// component; commas and '=' allowed (the caller quotes).
        fn abs_value() -> impl Strategy<Value = Vec<u8>> {
            prop::collection::vec(prop::collection::vec(byte().prop_filter("no quote", |&b| b != b'"' && b != b'/'), 1..6), 1..4)
                .prop_filter("no '..'", |parts| parts.iter().all(|p| p != b".."))
                .prop_map(|parts| {
                    let mut v = Vec::new();
                    for p in parts {
                        v.push(b'/');
                        v.extend(p);
                    }
                    v
                })
        }

        /// A value written into an option string: quoted if it holds a comma.
        fn quoted(key: &str, v: &[u8]) -> Vec<u8> {
            let mut s = key.as_bytes().to_vec();
            s.push(b'=');
            if v.contains(&b',') {
                s.push(b'"');
                s.extend(v);
                s.push(b'"');
            } else {
                s.extend(v);
            }
            s
        }

        proptest! {
            #![proptest_config(config(2000))]

            #[test]
            fn never_panics(s in option_string(), sloppy in any::<bool>(), config_file in any::<bool>()) {
                let origin = if config_file { Origin::Config } else { Origin::CommandLine };
                match MountOptions::parse(&s, origin, sloppy) {
                    Ok((o, _)) => {
                        if let Err(e) = o.check() {
                            documented(&e)?;
                        }
                    }
                    Err(e) => documented(&e)?,
                }
            }

            /// The raw bytes themselves, quotes and all.
            #[test]
            fn raw_bytes_never_panic(s in bytes(40), sloppy in any::<bool>()) {
                match MountOptions::parse(&s, Origin::CommandLine, sloppy) {
                    Ok((o, _)) => {
                        if let Err(e) = o.check() {
                            documented(&e)?;
                        }
                    }
                    Err(e) => documented(&e)?,
                }
            }
        }

        proptest! {
            #![proptest_config(config(500))]

            /// comment=, x-*= and loopback_root=/loopback_fallback= values
            /// come back byte-exact, commas (quoted) and non-UTF-8 included.
            #[test]
            fn values_round_trip(
                comment in bytes(16).prop_filter("no quote or comma", |v| !v.contains(&b'"') && !v.contains(&b',')),
                xval in bytes(16).prop_filter("no quote", |v| !v.contains(&b'"')),
                root in abs_value(),
                fallback in abs_value(),
                upper in abs_value().prop_filter("a file", |v| !v.ends_with(b"/")),
            ) {
                let s = [
                    quoted("comment", &comment),
                    quoted("loopback_root", &root),
                    quoted("x-test", &xval),
                    quoted("loopback_fallback", &fallback),
                    quoted("upper", &upper),
                ]
                .join(&b","[..]);
                let (o, w) = match MountOptions::parse(&s, Origin::CommandLine, false) {
                    Ok(x) => x,
                    Err(e) => return Err(TestCaseError::fail(format!("{:?}: {e}", OsStr::from_bytes(&s)))),
                };
                prop_assert!(w.is_empty());
                prop_assert_eq!(o.loopback_root.as_ref().map(|p| p.as_os_str().as_bytes()), Some(&root[..]));
                prop_assert_eq!(o.loopback_fallback.as_ref().map(|p| p.as_os_str().as_bytes()), Some(&fallback[..]));
                match &o.upper {
                    Some(Some(UpperSpec::Path(p))) => prop_assert_eq!(p.as_os_str().as_bytes(), &upper[..]),
                    other => return Err(TestCaseError::fail(format!("upper: {other:?}"))),
                }
                let mut c = b"comment=".to_vec();
                c.extend(&comment);
                let mut x = b"x-test=".to_vec();
                x.extend(&xval);
                prop_assert_eq!(o.userspace, vec![OsString::from_vec(c), OsString::from_vec(x)]);
            }

            /// With -s an unknown option is a warning, never an error; without,
            /// it is a usage error.
            #[test]
            fn sloppy_ignores_unknown(keys in prop::collection::vec(bytes(8), 1..5)) {
                // Keys that are no known option: a prefix no option has.
                let items: Vec<Vec<u8>> = keys
                    .into_iter()
                    .map(|k| {
                        let mut i = b"zz".to_vec();
                        i.extend(k.into_iter().filter(|&b| b != b',' && b != b'"' && b != b'='));
                        i
                    })
                    .collect();
                let s = items.join(&b","[..]);
                let (o, w) = MountOptions::parse(&s, Origin::CommandLine, true).map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(w.len(), items.len());
                prop_assert_eq!(o, MountOptions::default());
                let e = MountOptions::parse(&s, Origin::CommandLine, false).unwrap_err();
                prop_assert!(matches!(e, Error::Usage(_)));
            }

            /// Splitting gives back the items that were joined.
            #[test]
            fn split_round_trip(items in prop::collection::vec(bytes(10).prop_filter("an item", |v| !v.is_empty() && !v.contains(&b',') && !v.contains(&b'"')), 0..6)) {
                let got = split_options(&items.join(&b","[..])).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let want: Vec<RawOption> = items
                    .iter()
                    .map(|i| match i.iter().position(|&b| b == b'=') {
                        Some(p) => (i[..p].to_vec(), Some(i[p + 1..].to_vec())),
                        None => (i.clone(), None),
                    })
                    .collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
