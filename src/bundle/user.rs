//! The image config's `User` as uid, gid and supplementary groups, read
//! the way Docker and Podman read it: `user`, `uid`, `user:group`,
//! `uid:gid` (and mixes), names looked up in the image's own /etc/passwd
//! and /etc/group; empty is root. A uid alone takes its primary group from
//! /etc/passwd when it is listed there, else gid 0. Supplementary groups
//! are the /etc/group entries that list the user's name, when no group was
//! given.

use crate::error::{Error, Result};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
}

/// `name:x:uid:gid:...` lines: (name, uid, gid). Comments, blank and
/// malformed lines are skipped (as libc does).
fn passwd_entries(text: &str) -> Vec<(&str, u32, u32)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 || f[0].is_empty() || f[0].starts_with('#') {
                return None;
            }
            Some((f[0], f[2].parse().ok()?, f[3].parse().ok()?))
        })
        .collect()
}

/// `name:x:gid:member,member` lines: (name, gid, members).
fn group_entries(text: &str) -> Vec<(&str, u32, Vec<&str>)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 3 || f[0].is_empty() || f[0].starts_with('#') {
                return None;
            }
            let members = f.get(3).map(|m| m.split(',').filter(|s| !s.is_empty()).collect()).unwrap_or_default();
            Some((f[0], f[2].parse().ok()?, members))
        })
        .collect()
}

fn numeric(s: &str) -> Option<u32> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Resolve `spec` against the image's /etc/passwd and /etc/group (None:
/// the image has no such file).
pub fn resolve(spec: &str, passwd: Option<&str>, group: Option<&str>) -> Result<User> {
    let bad = |why: String| Error::bad_image(format!("image user {spec:?}"), why);
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if g.is_some_and(str::is_empty) || (u.is_empty() && g.is_some()) {
        return Err(bad("empty user or group".into()));
    }
    let pw = passwd.map(passwd_entries).unwrap_or_default();
    let gr = group.map(group_entries).unwrap_or_default();
    let (uid, pw_entry) = if u.is_empty() {
        (0, pw.iter().find(|e| e.1 == 0))
    } else if let Some(n) = numeric(u) {
        (n, pw.iter().find(|e| e.1 == n))
    } else {
        let what = if passwd.is_some() { "no such user in the image's /etc/passwd" } else { "the image has no /etc/passwd to look it up in" };
        let e = pw.iter().find(|e| e.0 == u).ok_or_else(|| bad(format!("{u}: {what}")))?;
        (e.1, Some(e))
    };
    let gid = match g {
        None => pw_entry.map(|e| e.2).unwrap_or(0),
        Some(g) => match numeric(g) {
            Some(n) => n,
            None => {
                let what = if group.is_some() { "no such group in the image's /etc/group" } else { "the image has no /etc/group to look it up in" };
                gr.iter().find(|e| e.0 == g).map(|e| e.1).ok_or_else(|| bad(format!("{g}: {what}")))?
            }
        },
    };
    let mut additional_gids = Vec::new();
    if g.is_none()
        && let Some((name, _, _)) = pw_entry
    {
        for (_, id, members) in &gr {
            if *id != gid && members.contains(name) && !additional_gids.contains(id) {
                additional_gids.push(*id);
            }
        }
    }
    Ok(User { uid, gid, additional_gids })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n# comment\nbroken line\nwww:x:33:34::/var/www:/bin/false\nbob:x:1000:1000::/home/bob:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwww-data:x:34:\nusers:x:100:bob,alice\nwheel:x:10:bob\nbob:x:1000:\n";

    #[test]
    fn users_resolve_like_docker() {
        type Want = std::result::Result<(u32, u32, &'static [u32]), &'static str>;
        let cases: &[(&str, Option<&str>, Option<&str>, Want)] = &[
            ("", Some(PASSWD), Some(GROUP), Ok((0, 0, &[]))),
            ("", None, None, Ok((0, 0, &[]))),
            ("0", None, None, Ok((0, 0, &[]))),
            ("1234", None, None, Ok((1234, 0, &[]))),
            ("1234:99", None, None, Ok((1234, 99, &[]))),
            ("33", Some(PASSWD), Some(GROUP), Ok((33, 34, &[]))),
            ("www", Some(PASSWD), Some(GROUP), Ok((33, 34, &[]))),
            ("bob", Some(PASSWD), Some(GROUP), Ok((1000, 1000, &[100, 10]))),
            ("1000", Some(PASSWD), Some(GROUP), Ok((1000, 1000, &[100, 10]))),
            ("bob:users", Some(PASSWD), Some(GROUP), Ok((1000, 100, &[]))),
            ("bob:7", Some(PASSWD), Some(GROUP), Ok((1000, 7, &[]))),
            ("5:wheel", Some(PASSWD), Some(GROUP), Ok((5, 10, &[]))),
            ("nobody", Some(PASSWD), Some(GROUP), Err("no such user in the image's /etc/passwd")),
            ("nobody", None, None, Err("the image has no /etc/passwd")),
            ("bob:staff", Some(PASSWD), Some(GROUP), Err("no such group in the image's /etc/group")),
            ("1:staff", Some(PASSWD), None, Err("the image has no /etc/group")),
            ("bob:", Some(PASSWD), Some(GROUP), Err("empty user or group")),
            (":5", Some(PASSWD), Some(GROUP), Err("empty user or group")),
            ("99999999999", None, None, Err("no /etc/passwd")),
        ];
        for (spec, pw, gr, want) in cases {
            let got = resolve(spec, *pw, *gr);
            match (want, got) {
                (Ok((u, g, extra)), Ok(got)) => {
                    assert_eq!(got, User { uid: *u, gid: *g, additional_gids: extra.to_vec() }, "{spec:?}")
                }
                (Err(frag), Err(e)) => assert!(e.to_string().contains(frag), "{spec:?}: {e}"),
                (w, g) => panic!("{spec:?}: want {w:?}, got {g:?}"),
            }
        }
    }
}
