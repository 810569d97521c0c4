//! Layer identifiers and image names: parsing, validation, and the OCI
//! ChainID rule. Pure code, no I/O.
//!
//! Everything that becomes part of a path in the store passes through here:
//! a digest is exactly 64 lowercase hex digits, a name is drawn from a small
//! alphabet and encoded into a single path component, so nothing a user
//! writes can reach outside the store directories.

use std::fmt;

use sha2::{Digest as _, Sha256};

use crate::error::{Error, Result};

/// A sha256 digest (`sha256:<64 hex>`): a layer's diff ID or chain ID.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest([u8; 32]);

impl Digest {
    pub fn parse(s: &str) -> Result<Self> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| Error::Usage(format!("{s:?}: not a sha256 digest (want sha256:<64 hex>)")))?;
        Self::from_hex(hex).ok_or_else(|| {
            Error::Usage(format!("{s:?}: not a sha256 digest (want sha256:<64 hex>)"))
        })
    }

    /// 64 lowercase hex digits, nothing else.
    pub fn from_hex(hex: &str) -> Option<Self> {
        if hex.len() != 64 || !is_lower_hex(hex) {
            return None;
        }
        let mut b = [0u8; 32];
        hex::decode_to_slice(hex, &mut b).ok()?;
        Some(Digest(b))
    }

    pub fn of_bytes(data: &[u8]) -> Self {
        Digest(Sha256::digest(data).into())
    }

    pub fn from_bytes(b: [u8; 32]) -> Self {
        Digest(b)
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    /// The first 12 hex digits, as docker shows IDs.
    pub fn short(&self) -> String {
        self.hex()[..12].to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// OCI image spec: ChainID(L0) = DiffID(L0);
/// ChainID(Ln) = sha256(ChainID(Ln-1) + " " + DiffID(Ln)).
pub fn chain_id(parent: Option<&Digest>, diff_id: &Digest) -> Digest {
    match parent {
        None => *diff_id,
        Some(p) => Digest::of_bytes(format!("{p} {diff_id}").as_bytes()),
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Shortest ID prefix accepted, as the contract says.
pub const MIN_PREFIX: usize = 12;

/// How a user names a layer: a full chain ID, a unique hex prefix of one, or
/// a name recorded in the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerRef {
    Id(Digest),
    Prefix(String),
    Name(Name),
}

impl LayerRef {
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(hex) = s.strip_prefix("sha256:") {
            return Self::parse_hex(s, hex);
        }
        if s.len() >= MIN_PREFIX && s.len() <= 64 && is_lower_hex(s) {
            return Self::parse_hex(s, s);
        }
        Ok(LayerRef::Name(Name::parse(s)?))
    }

    /// For `layers=`: an element is an ID or a prefix, never a name (names
    /// may contain ':' which separates the list).
    pub fn parse_id(s: &str) -> Result<Self> {
        let hex = s.strip_prefix("sha256:").unwrap_or(s);
        Self::parse_hex(s, hex)
    }

    fn parse_hex(orig: &str, hex: &str) -> Result<Self> {
        if !is_lower_hex(hex) || hex.is_empty() {
            return Err(Error::Usage(format!(
                "{orig:?}: a layer ID is sha256: and lowercase hex digits"
            )));
        }
        match hex.len() {
            64 => Ok(LayerRef::Id(Digest::from_hex(hex).expect("checked"))),
            n if (MIN_PREFIX..64).contains(&n) => Ok(LayerRef::Prefix(hex.to_string())),
            n if n < MIN_PREFIX => Err(Error::Usage(format!(
                "{orig:?}: an ID prefix needs at least {MIN_PREFIX} hex digits"
            ))),
            _ => Err(Error::Usage(format!("{orig:?}: longer than a sha256 digest"))),
        }
    }
}

impl fmt::Display for LayerRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerRef::Id(d) => write!(f, "{d}"),
            LayerRef::Prefix(p) => write!(f, "sha256:{p}"),
            LayerRef::Name(n) => write!(f, "{n}"),
        }
    }
}

/// An image or upper name, such as `debian:12` or `library/busybox:latest`.
///
/// Alphabet: ASCII letters, digits and `. _ - : / @ +`. It must start with
/// a letter or digit, contain no `//`, no `.` or `..` path component, no
/// trailing `/`, at most 255 bytes, and may not look like an ID prefix.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Name(String);

impl Name {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| Err(Error::Usage(format!("{s:?}: invalid name: {why}")));
        if s.is_empty() {
            return bad("empty");
        }
        if s.len() > 255 {
            return bad("longer than 255 bytes");
        }
        if !s.as_bytes()[0].is_ascii_alphanumeric() {
            return bad("must start with a letter or digit");
        }
        if let Some(c) = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || "._-:/@+".contains(*c)))
        {
            return bad(&format!("character {c:?} not allowed"));
        }
        if s.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return bad("empty, '.' or '..' path component");
        }
        if s.len() >= MIN_PREFIX && is_lower_hex(s) {
            return bad("looks like a layer ID; names must not be hex digits alone");
        }
        Ok(Name(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// One path component: '/' becomes "%2F" ('%' is not in the alphabet,
    /// so the encoding is reversible and cannot collide).
    pub fn file_name(&self) -> String {
        self.0.replace('/', "%2F")
    }

    pub fn from_file_name(f: &str) -> Option<Self> {
        Name::parse(&f.replace("%2F", "/")).ok()
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: &str = "3f2a000000000000000000000000000000000000000000000000000000000001";

    #[test]
    fn layer_refs() {
        let full = format!("sha256:{H}");
        let cases: &[(&str, Option<LayerRef>)] = &[
            (&full, Some(LayerRef::Id(Digest::from_hex(H).unwrap()))),
            (H, Some(LayerRef::Id(Digest::from_hex(H).unwrap()))),
            ("sha256:3f2a00000000", Some(LayerRef::Prefix("3f2a00000000".into()))),
            ("3f2a00000000", Some(LayerRef::Prefix("3f2a00000000".into()))),
            ("sha256:3f2a0000000", None), // 11 digits
            ("sha256:3F2A00000000", None), // uppercase
            ("sha256:", None),
            ("sha256:zz2a00000000", None),
            ("debian:12", Some(LayerRef::Name(Name("debian:12".into())))),
            ("3f2a", Some(LayerRef::Name(Name("3f2a".into())))), // short hex is a name
            ("library/busybox:1.36", Some(LayerRef::Name(Name("library/busybox:1.36".into())))),
            ("../etc", None),
            ("a/../b", None),
            ("/abs", None),
            ("a//b", None),
            ("a/", None),
            ("a b", None),
            ("a,b", None),
            ("", None),
            (".hidden", None),
        ];
        for (input, want) in cases {
            let got = LayerRef::parse(input).ok();
            assert_eq!(&got, want, "input {input:?}");
        }
        let long = format!("sha256:{H}0");
        assert!(LayerRef::parse(&long).is_err());
    }

    #[test]
    fn layers_list_elements_are_ids_only() {
        assert!(LayerRef::parse_id("debian").is_err());
        assert_eq!(
            LayerRef::parse_id("3f2a00000000").unwrap(),
            LayerRef::Prefix("3f2a00000000".into())
        );
    }

    #[test]
    fn name_encoding_roundtrip() {
        let n = Name::parse("reg.example:5000/ns/img:tag").unwrap();
        assert_eq!(n.file_name(), "reg.example:5000%2Fns%2Fimg:tag");
        assert_eq!(Name::from_file_name(&n.file_name()), Some(n));
        assert!(!Name::parse("a/b").unwrap().file_name().contains('/'));
        assert!(Name::parse(&"a".repeat(256)).is_err());
        assert!(Name::parse("a%2Fb").is_err());
    }

    #[test]
    fn chain_id_follows_oci() {
        // Values computed with: printf 'sha256:<a> sha256:<b>' | sha256sum
        let a = Digest::of_bytes(b"a");
        let b = Digest::of_bytes(b"b");
        assert_eq!(chain_id(None, &a), a);
        let c = chain_id(Some(&a), &b);
        let expect = Digest::of_bytes(format!("{a} {b}").as_bytes());
        assert_eq!(c, expect);
        assert_eq!(
            a.to_string(),
            "sha256:ca978112ca1bbdcafac231b39a23dc4da786eff8147c4e72b9807785afee48bb"
        );
        // serde round trip and rejection of junk
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<Digest>(&j).unwrap(), c);
        assert!(serde_json::from_str::<Digest>("\"sha256:12\"").is_err());
    }
}
