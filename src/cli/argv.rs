//! What mount(8) and umount(8) pass to a helper. Pure code.
//!
//! mount(8):  /sbin/mount.TYPE SOURCE TARGET [-s] [-f] [-n] [-v] [-o OPTS] [-t TYPE.SUBTYPE] [-N NS]
//! umount(8): /sbin/umount.TYPE TARGET [-n] [-l] [-f] [-v] [-r] [-t TYPE] [-N NS]
//! Flags may come before or after the positional arguments and may be
//! bundled (`-fv`); `-o` may be given more than once (joined with ',').
//!
//! Arguments are bytes, not text: a mount point is any path the kernel
//! takes (`/srv/caf\xe9`), and an option value may name one. Nothing here
//! assumes UTF-8; only the flag letters are ASCII.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::PathBuf;

use crate::error::{Error, Result};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountArgs {
    pub source: OsString,
    pub target: PathBuf,
    pub sloppy: bool,
    pub fake: bool,
    pub no_mtab: bool,
    pub verbose: bool,
    /// Every `-o` joined with ',', as bytes.
    pub options: Vec<u8>,
    pub fstype: Option<OsString>,
    pub namespace: Option<OsString>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UmountArgs {
    pub target: PathBuf,
    pub no_mtab: bool,
    pub lazy: bool,
    pub force: bool,
    pub verbose: bool,
    pub remount_ro: bool,
    pub fstype: Option<OsString>,
    pub namespace: Option<OsString>,
}

/// `--help` or `--version`, which mount(8) never passes but a person may.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Info {
    Help,
    Version,
}

/// What a helper's argv asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Parsed<T> {
    Run(T),
    Info(Info),
}

pub const MOUNT_USAGE: &str = "usage: mount.sharedloop SOURCE TARGET [-sfnvrw] [-o OPTIONS] [-t TYPE] [-N NAMESPACE]";
pub const UMOUNT_USAGE: &str = "usage: umount.sharedloop TARGET [-nlfvr] [-t TYPE] [-N NAMESPACE]";

/// A long option alone in argv (`--help`, `--version`), else None. Any
/// other `--word` is an error naming it, not a bundle of letters.
fn long_option(args: &[OsString]) -> Result<Option<Info>> {
    for a in args {
        let b = a.as_bytes();
        if b == b"--" {
            return Ok(None);
        }
        match b {
            b"--help" => return Ok(Some(Info::Help)),
            b"--version" => return Ok(Some(Info::Version)),
            _ if b.starts_with(b"--") => {
                return Err(Error::Usage(format!("unrecognized option {:?}", a)));
            }
            _ => {}
        }
    }
    Ok(None)
}

/// Walk argv: `flags` lists value-less flags, `valued` flags that take a
/// value. Returns (positionals, [(flag, value)]).
#[allow(clippy::type_complexity)]
fn scan(args: &[OsString], flags: &[u8], valued: &[u8]) -> Result<(Vec<OsString>, Vec<(u8, Option<OsString>)>)> {
    let mut pos = Vec::new();
    let mut got = Vec::new();
    let mut i = 0;
    let mut only_pos = false;
    while i < args.len() {
        let a = args[i].as_bytes();
        i += 1;
        if only_pos || !a.starts_with(b"-") || a == b"-" {
            pos.push(OsString::from_vec(a.to_vec()));
            continue;
        }
        if a == b"--" {
            only_pos = true;
            continue;
        }
        let mut j = 1;
        while j < a.len() {
            let c = a[j];
            j += 1;
            if valued.contains(&c) {
                let v = if j < a.len() {
                    OsString::from_vec(a[j..].to_vec())
                } else if i < args.len() {
                    i += 1;
                    args[i - 1].clone()
                } else {
                    return Err(Error::Usage(format!("option -{} requires an argument", c as char)));
                };
                got.push((c, Some(v)));
                break;
            } else if flags.contains(&c) {
                got.push((c, None));
            } else if c.is_ascii_graphic() {
                return Err(Error::Usage(format!("invalid option -- '{}'", c as char)));
            } else {
                return Err(Error::Usage(format!("invalid option -- {:?}", OsStr::from_bytes(&a[j - 1..j]))));
            }
        }
    }
    Ok((pos, got))
}

impl MountArgs {
    pub fn parse(args: &[OsString]) -> Result<Parsed<MountArgs>> {
        if let Some(i) = long_option(args)? {
            return Ok(Parsed::Info(i));
        }
        let (pos, flags) = scan(args, b"sfnvrwi", b"otN")?;
        let mut m = MountArgs::default();
        let mut opts: Vec<Vec<u8>> = Vec::new();
        for (c, v) in flags {
            match c {
                b's' => m.sloppy = true,
                b'f' => m.fake = true,
                b'n' => m.no_mtab = true,
                b'v' => m.verbose = true,
                // mount(8) of some versions pass -r/-w instead of ro/rw, -i
                // for "internal only": fold them into the options.
                b'r' => opts.push(b"ro".to_vec()),
                b'w' => opts.push(b"rw".to_vec()),
                b'i' => {}
                b'o' => opts.push(v.unwrap_or_default().into_vec()),
                b't' => m.fstype = v,
                b'N' => m.namespace = v,
                _ => unreachable!("scan returns only the letters it was given"),
            }
        }
        match <[OsString; 2]>::try_from(pos) {
            Ok([s, t]) => {
                m.source = s;
                m.target = PathBuf::from(t);
            }
            Err(pos) => return Err(Error::Usage(format!("{MOUNT_USAGE} (got {} positional arguments)", pos.len()))),
        }
        if m.source.is_empty() || m.target.as_os_str().is_empty() {
            return Err(Error::Usage("empty SOURCE or TARGET".into()));
        }
        m.options = opts.into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(&b","[..]);
        Ok(Parsed::Run(m))
    }
}

impl UmountArgs {
    pub fn parse(args: &[OsString]) -> Result<Parsed<UmountArgs>> {
        if let Some(i) = long_option(args)? {
            return Ok(Parsed::Info(i));
        }
        let (pos, flags) = scan(args, b"nlfvri", b"tN")?;
        let mut u = UmountArgs::default();
        for (c, v) in flags {
            match c {
                b'n' => u.no_mtab = true,
                b'l' => u.lazy = true,
                b'f' => u.force = true,
                b'v' => u.verbose = true,
                b'r' => u.remount_ro = true,
                b'i' => {}
                b't' => u.fstype = v,
                b'N' => u.namespace = v,
                _ => unreachable!("scan returns only the letters it was given"),
            }
        }
        match <[OsString; 1]>::try_from(pos) {
            Ok([t]) if !t.is_empty() => u.target = PathBuf::from(t),
            Ok(_) => return Err(Error::Usage("empty TARGET".into())),
            Err(pos) => return Err(Error::Usage(format!("{UMOUNT_USAGE} (got {} positional arguments)", pos.len()))),
        }
        Ok(Parsed::Run(u))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    fn run<T>(p: Result<Parsed<T>>) -> Option<T> {
        match p {
            Ok(Parsed::Run(t)) => Some(t),
            _ => None,
        }
    }

    #[test]
    fn mount_argv() {
        let cases: &[(&str, Option<MountArgs>)] = &[
            (
                "src /mnt -o ro,upper=x",
                Some(MountArgs { source: "src".into(), target: "/mnt".into(), options: b"ro,upper=x".to_vec(), ..Default::default() }),
            ),
            (
                "src /mnt -s -f -n -v -o a -t sharedloop.sub -N 1234",
                Some(MountArgs {
                    source: "src".into(),
                    target: "/mnt".into(),
                    sloppy: true,
                    fake: true,
                    no_mtab: true,
                    verbose: true,
                    options: b"a".to_vec(),
                    fstype: Some("sharedloop.sub".into()),
                    namespace: Some("1234".into()),
                }),
            ),
            (
                "-fv -oro src /mnt -o nosuid",
                Some(MountArgs { source: "src".into(), target: "/mnt".into(), fake: true, verbose: true, options: b"ro,nosuid".to_vec(), ..Default::default() }),
            ),
            ("src /mnt -r", Some(MountArgs { source: "src".into(), target: "/mnt".into(), options: b"ro".to_vec(), ..Default::default() })),
            ("src /mnt -- -odd", None),
            ("src", None),
            ("a b c", None),
            ("src /mnt -x", None),
            ("src /mnt -o", None),
            ("", None),
        ];
        for (s, want) in cases {
            assert_eq!(run(MountArgs::parse(&v(s))), *want, "{s:?}");
        }
        let e = MountArgs::parse(&v("src /mnt -q")).unwrap_err().to_string();
        assert_eq!(e, "invalid option -- 'q'");
        let e = MountArgs::parse(&v("src /mnt --bogus")).unwrap_err().to_string();
        assert_eq!(e, "unrecognized option \"--bogus\"");
    }

    #[test]
    fn help_and_version() {
        let cases: &[(&str, Option<Info>)] = &[
            ("--help", Some(Info::Help)),
            ("src /mnt --version", Some(Info::Version)),
            ("--version --help", Some(Info::Version)),
            ("src /mnt", None),
        ];
        for (s, want) in cases {
            let got = match MountArgs::parse(&v(s)).unwrap() {
                Parsed::Info(i) => Some(i),
                Parsed::Run(_) => None,
            };
            assert_eq!(got, *want, "mount {s:?}");
            if s.contains("src") {
                continue;
            }
            let got = match UmountArgs::parse(&v(s)).unwrap() {
                Parsed::Info(i) => Some(i),
                Parsed::Run(_) => None,
            };
            assert_eq!(got, *want, "umount {s:?}");
        }
        // After "--", "--help" is a positional.
        assert!(matches!(UmountArgs::parse(&v("-- --help")).unwrap(), Parsed::Run(u) if u.target == PathBuf::from("--help")));
    }

    #[test]
    fn bytes_pass_through() {
        // A mount point and option values that are not UTF-8 arrive as they were.
        let args = vec![
            OsString::from("img"),
            OsString::from_vec(b"/srv/caf\xe9".to_vec()),
            OsString::from("-o"),
            OsString::from_vec(b"ro,comment=\xff".to_vec()),
            OsString::from_vec(b"-o\xfe".to_vec()),
        ];
        let m = run(MountArgs::parse(&args)).unwrap();
        assert_eq!(m.target.as_os_str().as_bytes(), b"/srv/caf\xe9");
        assert_eq!(m.options, b"ro,comment=\xff,\xfe");
        let e = MountArgs::parse(&[OsString::from_vec(b"-\xff".to_vec())]).unwrap_err().to_string();
        assert_eq!(e, "invalid option -- \"\\xFF\"");
        let u = run(UmountArgs::parse(&[OsString::from_vec(b"/x\xff".to_vec())])).unwrap();
        assert_eq!(u.target.as_os_str().as_bytes(), b"/x\xff");
    }

    #[test]
    fn umount_argv() {
        let cases: &[(&str, Option<UmountArgs>)] = &[
            ("/mnt", Some(UmountArgs { target: "/mnt".into(), ..Default::default() })),
            (
                "/mnt -n -l -f -v -r -t sharedloop -N /proc/1/ns/mnt",
                Some(UmountArgs {
                    target: "/mnt".into(),
                    no_mtab: true,
                    lazy: true,
                    force: true,
                    verbose: true,
                    remount_ro: true,
                    fstype: Some("sharedloop".into()),
                    namespace: Some("/proc/1/ns/mnt".into()),
                }),
            ),
            ("-lv /mnt", Some(UmountArgs { target: "/mnt".into(), lazy: true, verbose: true, ..Default::default() })),
            ("", None),
            ("/a /b", None),
            ("/mnt -o x", None),
        ];
        for (s, want) in cases {
            assert_eq!(run(UmountArgs::parse(&v(s))), *want, "{s:?}");
        }
    }

    /// Property tests: arbitrary argv (bytes, not text) never panics the
    /// parsers, every refusal is a usage error (exit 1), and what a
    /// well-formed argv says comes back as it was given.
    mod fuzz {
        use super::super::*;
        use crate::error::ExitCode;
        use proptest::prelude::*;

        use crate::proptest_config as config;

        /// A byte of argv (never NUL): often one the parser looks at.
        fn byte() -> impl Strategy<Value = u8> {
            prop_oneof![
                3 => prop::sample::select(&b"-,=\"' /.ofnsvrwitNlx"[..]),
                2 => b'a'..=b'z',
                2 => 0x80u8..=0xff,
                1 => 1u8..=0xff,
            ]
        }

        /// One argv word: a flag, a long option, or bytes.
        fn word() -> impl Strategy<Value = OsString> {
            prop_oneof![
                2 => prop::sample::select(vec![
                    "-f", "-s", "-n", "-v", "-r", "-w", "-i", "-l", "-o", "-t", "-N", "-fv", "-oro", "-", "--", "--help",
                    "--version", "--bogus", "-x", "src", "/mnt",
                ])
                .prop_map(OsString::from),
                3 => prop::collection::vec(byte(), 0..12).prop_map(OsString::from_vec),
                1 => prop::collection::vec(byte(), 0..6).prop_map(|b| {
                    let mut w = b"-".to_vec();
                    w.extend(b);
                    OsString::from_vec(w)
                }),
            ]
        }

        fn argv() -> impl Strategy<Value = Vec<OsString>> {
            prop::collection::vec(word(), 0..8)
        }

        /// Non-empty bytes not taken for a flag.
        fn positional() -> impl Strategy<Value = OsString> {
            (prop::sample::select(&b"abc/.,=\"\x80\xff"[..]), prop::collection::vec(byte(), 0..10)).prop_map(|(first, rest)| {
                let mut w = vec![first];
                w.extend(rest);
                OsString::from_vec(w)
            })
        }

        /// An option value: any bytes that do not start like a long option.
        fn value() -> impl Strategy<Value = OsString> {
            prop::collection::vec(byte(), 0..12).prop_filter("not a long option", |v| !v.starts_with(b"--")).prop_map(OsString::from_vec)
        }

        fn usage_only<T>(r: &Result<Parsed<T>>) -> std::result::Result<(), TestCaseError> {
            if let Err(e) = r {
                prop_assert!(matches!(e, Error::Usage(_)), "not a usage error: {e:?}");
                prop_assert_eq!(e.exit_code(), ExitCode::Usage);
                prop_assert!(!e.to_string().is_empty());
            }
            Ok(())
        }

        proptest! {
            #![proptest_config(config(2000))]

            #[test]
            fn mount_never_panics(args in argv()) {
                let r = MountArgs::parse(&args);
                usage_only(&r)?;
                if let Ok(Parsed::Run(m)) = r {
                    prop_assert!(!m.source.is_empty() && !m.target.as_os_str().is_empty());
                }
            }

            #[test]
            fn umount_never_panics(args in argv()) {
                let r = UmountArgs::parse(&args);
                usage_only(&r)?;
                if let Ok(Parsed::Run(u)) = r {
                    prop_assert!(!u.target.as_os_str().is_empty());
                }
            }
        }

        proptest! {
            #![proptest_config(config(500))]

            /// SOURCE, TARGET and every -o/-t value come back byte-exact,
            /// wherever the flags sit and whether a value is attached.
            #[test]
            fn mount_round_trip(
                source in positional(),
                target in positional(),
                opts in prop::collection::vec((value(), any::<bool>()), 0..4),
                fstype in prop::option::of(value()),
                flags in prop::sample::subsequence(&b"sfnv"[..], 0..=4),
                split in 0usize..3,
                dashdash in any::<bool>(),
            ) {
                let mut pre: Vec<OsString> = Vec::new();
                for (v, attached) in &opts {
                    if *attached && !v.is_empty() {
                        let mut w = b"-o".to_vec();
                        w.extend(v.as_bytes());
                        pre.push(OsString::from_vec(w));
                    } else {
                        pre.push("-o".into());
                        pre.push(v.clone());
                    }
                }
                if let Some(t) = &fstype {
                    pre.push("-t".into());
                    pre.push(t.clone());
                }
                if !flags.is_empty() {
                    let mut w = b"-".to_vec();
                    w.extend(&flags);
                    pre.push(OsString::from_vec(w));
                }
                // Positionals at the start, in the middle (between whole
                // flag groups) or after "--" at the end.
                let mut args: Vec<OsString> = Vec::new();
                match split {
                    0 => {
                        args.extend([source.clone(), target.clone()]);
                        args.extend(pre);
                    }
                    1 => {
                        args.push(source.clone());
                        args.extend(pre);
                        args.push(target.clone());
                    }
                    _ => {
                        args.extend(pre);
                        if dashdash {
                            args.push("--".into());
                        }
                        args.extend([source.clone(), target.clone()]);
                    }
                }
                let m = match MountArgs::parse(&args) {
                    Ok(Parsed::Run(m)) => m,
                    other => return Err(TestCaseError::fail(format!("{args:?}: {other:?}"))),
                };
                prop_assert_eq!(m.source.as_bytes(), source.as_bytes());
                prop_assert_eq!(m.target.as_os_str().as_bytes(), target.as_bytes());
                let want: Vec<&[u8]> = opts.iter().map(|(v, _)| v.as_bytes()).filter(|v| !v.is_empty()).collect();
                prop_assert_eq!(m.options, want.join(&b","[..]));
                prop_assert_eq!(m.fstype, fstype);
                for (c, got) in [(b's', m.sloppy), (b'f', m.fake), (b'n', m.no_mtab), (b'v', m.verbose)] {
                    prop_assert_eq!(got, flags.contains(&c));
                }
            }

            #[test]
            fn umount_round_trip(
                target in positional(),
                fstype in prop::option::of(value()),
                flags in prop::sample::subsequence(&b"nlfvr"[..], 0..=5),
                first in any::<bool>(),
            ) {
                let mut rest: Vec<OsString> = Vec::new();
                if !flags.is_empty() {
                    let mut w = b"-".to_vec();
                    w.extend(&flags);
                    rest.push(OsString::from_vec(w));
                }
                if let Some(t) = &fstype {
                    rest.push("-t".into());
                    rest.push(t.clone());
                }
                let args: Vec<OsString> =
                    if first { std::iter::once(target.clone()).chain(rest).collect() } else { rest.into_iter().chain([target.clone()]).collect() };
                let u = match UmountArgs::parse(&args) {
                    Ok(Parsed::Run(u)) => u,
                    other => return Err(TestCaseError::fail(format!("{args:?}: {other:?}"))),
                };
                prop_assert_eq!(u.target.as_os_str().as_bytes(), target.as_bytes());
                prop_assert_eq!(u.fstype, fstype);
                for (c, got) in [(b'n', u.no_mtab), (b'l', u.lazy), (b'f', u.force), (b'v', u.verbose), (b'r', u.remount_ro)] {
                    prop_assert_eq!(got, flags.contains(&c));
                }
            }
        }
    }
}
