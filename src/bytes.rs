//! Paths and option values are bytes, not text. Helpers to carry them
//! unchanged through the places that want text: the octal escapes of
//! mountinfo and utab, and JSON (mount records, `--json` output).
//!
//! In JSON a path is a string; where it is not UTF-8 (or holds a
//! backslash) the bytes are escaped as `\xNN` and a backslash as `\\`, so
//! every path reads back byte for byte. Paths that are plain UTF-8 without
//! a backslash, nearly all of them, read exactly as they are.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

/// The kernel's and libmount's escaping of a mountinfo/utab field: space,
/// tab, newline and backslash as `\ooo`; every other byte as it is.
pub fn mount_escape(b: &[u8]) -> Vec<u8> {
    let mut o = Vec::with_capacity(b.len());
    for &c in b {
        match c {
            b' ' | b'\t' | b'\n' | b'\\' => o.extend_from_slice(format!("\\{c:03o}").as_bytes()),
            c => o.push(c),
        }
    }
    o
}

/// Undo `\ooo` escapes (any three octal digits up to 255); anything else,
/// a lone backslash included, is kept as it is.
pub fn mount_unescape(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            let oct = &b[i + 1..i + 4];
            if oct.iter().all(|c| (b'0'..=b'7').contains(c)) {
                let v = u32::from(oct[0] - b'0') * 64 + u32::from(oct[1] - b'0') * 8 + u32::from(oct[2] - b'0');
                if let Ok(v) = u8::try_from(v) {
                    out.push(v);
                    i += 4;
                    continue;
                }
            }
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// `b` as JSON-safe text: UTF-8 kept, `\` as `\\`, other bytes `\xNN`.
pub fn to_text(b: &[u8]) -> String {
    let mut o = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c == '\\' {
                o.push_str("\\\\");
            } else {
                o.push(c);
            }
        }
        for x in chunk.invalid() {
            o.push_str(&format!("\\x{x:02X}"));
        }
    }
    o
}

/// The inverse of [`to_text`]; None if `s` has an escape `to_text` would
/// not write.
pub fn from_text(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut o = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] != b'\\' {
            o.push(b[i]);
            i += 1;
            continue;
        }
        match b.get(i + 1) {
            Some(b'\\') => {
                o.push(b'\\');
                i += 2;
            }
            Some(b'x') => {
                let hex = std::str::from_utf8(b.get(i + 2..i + 4)?).ok()?;
                o.push(u8::from_str_radix(hex, 16).ok()?);
                i += 4;
            }
            _ => return None,
        }
    }
    Some(o)
}

pub fn path_from(b: &[u8]) -> PathBuf {
    PathBuf::from(OsStr::from_bytes(b))
}

pub fn os_from(b: Vec<u8>) -> OsString {
    OsString::from_vec(b)
}

/// serde for `PathBuf` fields as escaped text (`#[serde(with = "crate::bytes::path")]`).
pub mod path {
    use super::*;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Path, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_text(p.as_os_str().as_bytes()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<PathBuf, D::Error> {
        let s = String::deserialize(d)?;
        from_text(&s).map(|b| path_from(&b)).ok_or_else(|| serde::de::Error::custom(format!("bad escape in path {s:?}")))
    }
}

/// The same for `Option<PathBuf>`.
pub mod opt_path {
    use super::*;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(p: &Option<PathBuf>, s: S) -> Result<S::Ok, S::Error> {
        match p {
            Some(p) => s.serialize_some(&to_text(p.as_os_str().as_bytes())),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<PathBuf>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) => from_text(&s)
                .map(|b| Some(path_from(&b)))
                .ok_or_else(|| serde::de::Error::custom(format!("bad escape in path {s:?}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_escapes_round_trip() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"/srv/a b", b"/srv/a\\040b"),
            (b"/t\tn\nb\\", b"/t\\011n\\012b\\134"),
            (b"/caf\xe9", b"/caf\xe9"),
            (b"", b""),
        ];
        for (raw, esc) in cases {
            assert_eq!(mount_escape(raw), *esc, "{raw:?}");
            assert_eq!(mount_unescape(esc), *raw, "{esc:?}");
        }
        // Not an escape: kept.
        assert_eq!(mount_unescape(b"a\\04"), b"a\\04");
        assert_eq!(mount_unescape(b"\\999"), b"\\999");
        assert_eq!(mount_unescape(b"\\777"), b"\\777");
    }

    #[test]
    fn text_round_trip() {
        let cases: &[(&[u8], &str)] = &[
            (b"/srv/app", "/srv/app"),
            (b"/srv/caf\xc3\xa9", "/srv/caf\u{e9}"),
            (b"/srv/caf\xe9", "/srv/caf\\xE9"),
            (b"/a\\b", "/a\\\\b"),
            (b"\xff\xfe", "\\xFF\\xFE"),
        ];
        for (raw, text) in cases {
            assert_eq!(to_text(raw), *text, "{raw:?}");
            assert_eq!(from_text(text).as_deref(), Some(*raw), "{text:?}");
        }
        for bad in ["\\", "\\q", "\\x", "\\xZZ", "\\x4"] {
            assert_eq!(from_text(bad), None, "{bad:?}");
        }
        // Every byte string survives JSON.
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct R {
            #[serde(with = "path")]
            p: PathBuf,
            #[serde(with = "opt_path")]
            q: Option<PathBuf>,
        }
        let all: Vec<u8> = (0..=255u8).collect();
        let r = R { p: path_from(&all), q: Some(path_from(b"/x\xff")) };
        let j = serde_json::to_string(&r).unwrap();
        assert_eq!(serde_json::from_str::<R>(&j).unwrap(), r);
        let r = R { p: "/plain".into(), q: None };
        assert_eq!(serde_json::to_string(&r).unwrap(), r#"{"p":"/plain","q":null}"#);
    }
}
