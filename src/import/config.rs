//! The parts of an image config (OCI image-spec `config`, which Docker's
//! shares) that say how to run the image: Env, Entrypoint, Cmd,
//! WorkingDir, User, os and architecture, and the diff IDs that tie a
//! config to a chain ID.

use serde::Deserialize;

use crate::error::{Error, Result};
use crate::store::ids::{Digest, chain_id};

#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: Option<String>,
    #[serde(default)]
    pub os: Option<String>,
    #[serde(default)]
    pub config: Option<RunConfig>,
    #[serde(default)]
    pub rootfs: Option<RootFs>,
}

/// The image's defaults for a container (all optional, any may be null).
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
pub struct RunConfig {
    #[serde(rename = "User", default)]
    pub user: Option<String>,
    #[serde(rename = "Env", default)]
    pub env: Option<Vec<String>>,
    #[serde(rename = "Entrypoint", default)]
    pub entrypoint: Option<Vec<String>>,
    #[serde(rename = "Cmd", default)]
    pub cmd: Option<Vec<String>>,
    #[serde(rename = "WorkingDir", default)]
    pub working_dir: Option<String>,
}

#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
pub struct RootFs {
    #[serde(default)]
    pub diff_ids: Vec<String>,
}

impl ImageConfig {
    pub fn parse(data: &[u8], what: &str) -> Result<ImageConfig> {
        serde_json::from_slice(data).map_err(|e| Error::bad_image(what, format!("invalid image config: {e}")))
    }

    pub fn run(&self) -> RunConfig {
        self.config.clone().unwrap_or_default()
    }

    /// The chain ID of the config's top layer (None for a config without
    /// layers): the image this config belongs to.
    pub fn top_chain(&self, what: &str) -> Result<Option<Digest>> {
        let mut top = None;
        for (i, d) in self.rootfs.iter().flat_map(|r| r.diff_ids.iter()).enumerate() {
            let diff = Digest::parse(d).map_err(|_| Error::bad_image(what, format!("diff ID {} is malformed: {d:?}", i + 1)))?;
            top = Some(chain_id(top.as_ref(), &diff));
        }
        Ok(top)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse_with_nulls_and_give_their_chain() {
        let d1 = format!("sha256:{}", "a".repeat(64));
        let d2 = format!("sha256:{}", "b".repeat(64));
        let text = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"User":"1:2","Env":["A=1"],"Entrypoint":null,"Cmd":["sh"],"WorkingDir":""}},"rootfs":{{"type":"layers","diff_ids":["{d1}","{d2}"]}}}}"#
        );
        let c = ImageConfig::parse(text.as_bytes(), "t").unwrap();
        let r = c.run();
        assert_eq!(r.user.as_deref(), Some("1:2"));
        assert_eq!(r.entrypoint, None);
        assert_eq!(r.cmd, Some(vec!["sh".to_string()]));
        let p1 = Digest::parse(&d1).unwrap();
        let want = chain_id(Some(&chain_id(None, &p1)), &Digest::parse(&d2).unwrap());
        assert_eq!(c.top_chain("t").unwrap(), Some(want));
        assert_eq!(ImageConfig::parse(b"{}", "t").unwrap().top_chain("t").unwrap(), None);
        assert!(ImageConfig::parse(b"\"x\"", "t").unwrap_err().to_string().contains("invalid image config"));
        let bad = br#"{"rootfs":{"diff_ids":["md5:00"]}}"#;
        assert!(ImageConfig::parse(bad, "t").unwrap().top_chain("t").unwrap_err().to_string().contains("diff ID 1"));
    }
}
