//! What mount(8) and umount(8) pass to a helper. Pure code.
//!
//! mount(8):  /sbin/mount.TYPE SOURCE TARGET [-s] [-f] [-n] [-v] [-o OPTS] [-t TYPE.SUBTYPE] [-N NS]
//! umount(8): /sbin/umount.TYPE TARGET [-n] [-l] [-f] [-v] [-r] [-t TYPE] [-N NS]
//! Flags may come before or after the positional arguments and may be
//! bundled (`-fv`); `-o` may be given more than once (joined with ',').

use crate::error::{Error, Result};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MountArgs {
    pub source: String,
    pub target: String,
    pub sloppy: bool,
    pub fake: bool,
    pub no_mtab: bool,
    pub verbose: bool,
    pub options: String,
    pub fstype: Option<String>,
    pub namespace: Option<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UmountArgs {
    pub target: String,
    pub no_mtab: bool,
    pub lazy: bool,
    pub force: bool,
    pub verbose: bool,
    pub remount_ro: bool,
    pub fstype: Option<String>,
    pub namespace: Option<String>,
}

/// Walk argv: `flag(c)` handles value-less flags, `valued` lists flags that
/// take a value. Returns (positionals, [(flag, value)]).
fn scan(args: &[String], flags: &str, valued: &str) -> Result<(Vec<String>, Vec<(char, Option<String>)>)> {
    let mut pos = Vec::new();
    let mut got = Vec::new();
    let mut i = 0;
    let mut only_pos = false;
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if only_pos || !a.starts_with('-') || a == "-" {
            pos.push(a.clone());
            continue;
        }
        if a == "--" {
            only_pos = true;
            continue;
        }
        let chars: Vec<char> = a[1..].chars().collect();
        let mut j = 0;
        while j < chars.len() {
            let c = chars[j];
            j += 1;
            if valued.contains(c) {
                let rest: String = chars[j..].iter().collect();
                let v = if !rest.is_empty() {
                    rest
                } else if i < args.len() {
                    i += 1;
                    args[i - 1].clone()
                } else {
                    return Err(Error::Usage(format!("option -{c} requires an argument")));
                };
                got.push((c, Some(v)));
                break;
            } else if flags.contains(c) {
                got.push((c, None));
            } else {
                return Err(Error::Usage(format!("invalid option -- '{c}'")));
            }
        }
    }
    Ok((pos, got))
}

impl MountArgs {
    pub fn parse(args: &[String]) -> Result<MountArgs> {
        let (pos, flags) = scan(args, "sfnvrwi", "otN")?;
        let mut m = MountArgs::default();
        let mut opts: Vec<String> = Vec::new();
        for (c, v) in flags {
            match c {
                's' => m.sloppy = true,
                'f' => m.fake = true,
                'n' => m.no_mtab = true,
                'v' => m.verbose = true,
                // mount(8) of some versions pass -r/-w instead of ro/rw, -i
                // for "internal only": fold them into the options.
                'r' => opts.push("ro".into()),
                'w' => opts.push("rw".into()),
                'i' => {}
                'o' => opts.push(v.unwrap_or_default()),
                't' => m.fstype = v,
                'N' => m.namespace = v,
                _ => unreachable!(),
            }
        }
        match pos.as_slice() {
            [s, t] => {
                m.source = s.clone();
                m.target = t.clone();
            }
            _ => {
                return Err(Error::Usage(format!(
                    "usage: mount.sharedloop SOURCE TARGET [-sfnv] [-o OPTIONS] [-t TYPE] [-N NS] (got {} positional arguments)",
                    pos.len()
                )));
            }
        }
        if m.source.is_empty() || m.target.is_empty() {
            return Err(Error::Usage("empty SOURCE or TARGET".into()));
        }
        m.options = opts.into_iter().filter(|s| !s.is_empty()).collect::<Vec<_>>().join(",");
        Ok(m)
    }
}

impl UmountArgs {
    pub fn parse(args: &[String]) -> Result<UmountArgs> {
        let (pos, flags) = scan(args, "nlfvri", "tN")?;
        let mut u = UmountArgs::default();
        for (c, v) in flags {
            match c {
                'n' => u.no_mtab = true,
                'l' => u.lazy = true,
                'f' => u.force = true,
                'v' => u.verbose = true,
                'r' => u.remount_ro = true,
                'i' => {}
                't' => u.fstype = v,
                'N' => u.namespace = v,
                _ => unreachable!(),
            }
        }
        match pos.as_slice() {
            [t] if !t.is_empty() => u.target = t.clone(),
            _ => {
                return Err(Error::Usage(format!(
                    "usage: umount.sharedloop TARGET [-nlfvr] [-t TYPE] [-N NS] (got {} positional arguments)",
                    pos.len()
                )));
            }
        }
        Ok(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn mount_argv() {
        let cases: &[(&str, Option<MountArgs>)] = &[
            (
                "src /mnt -o ro,upper=x",
                Some(MountArgs { source: "src".into(), target: "/mnt".into(), options: "ro,upper=x".into(), ..Default::default() }),
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
                    options: "a".into(),
                    fstype: Some("sharedloop.sub".into()),
                    namespace: Some("1234".into()),
                }),
            ),
            (
                "-fv -oro src /mnt -o nosuid",
                Some(MountArgs { source: "src".into(), target: "/mnt".into(), fake: true, verbose: true, options: "ro,nosuid".into(), ..Default::default() }),
            ),
            ("src /mnt -r", Some(MountArgs { source: "src".into(), target: "/mnt".into(), options: "ro".into(), ..Default::default() })),
            ("src", None),
            ("a b c", None),
            ("src /mnt -x", None),
            ("src /mnt -o", None),
            ("", None),
        ];
        for (s, want) in cases {
            assert_eq!(MountArgs::parse(&v(s)).ok(), *want, "{s:?}");
        }
        let e = MountArgs::parse(&v("src /mnt -q")).unwrap_err().to_string();
        assert_eq!(e, "invalid option -- 'q'");
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
            assert_eq!(UmountArgs::parse(&v(s)).ok(), *want, "{s:?}");
        }
    }
}
