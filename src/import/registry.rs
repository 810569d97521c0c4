//! `import docker://REF`: an image pulled from a registry.
//!
//! The registry protocol is skopeo's, not ours: every site that pulls
//! images already runs and trusts it, and with it come, configured the way
//! podman and skopeo users already have them, auth.json files
//! (`REGISTRY_AUTH_FILE`, `$XDG_RUNTIME_DIR/containers/auth.json`, ...)
//! and their credential helpers, token authentication, registries.conf
//! (mirrors, blocked and insecure registries), certificates in
//! /etc/containers/certs.d, proxies and retries. Speaking the protocol
//! ourselves would mean re-implementing all of that, or pulling in an HTTP
//! and TLS stack and still honouring none of those files.
//!
//! What is ours is deciding what to fetch. The pull goes:
//!
//! 1. `skopeo inspect --raw` reads the manifest the reference names; an
//!    index (manifest list) is resolved to the manifest for `--platform`
//!    (default linux/this machine) and read in turn. Its digest is taken
//!    from the bytes read, so everything after is pinned to
//!    `REPO@DIGEST`: a tag that moves while we pull cannot mix two images.
//! 2. `skopeo inspect --config --raw REPO@DIGEST` reads the config; it is
//!    checked against the manifest, and its diff IDs give the chain IDs.
//! 3. For every layer whose chain is already in the store a sparse
//!    placeholder file of the blob's size is planted in a node-local OCI
//!    layout directory under the blob's digest: skopeo's `oci:`
//!    destination takes an existing blob file as already there and never
//!    downloads it (tests/registry.rs counts the registry's blob GETs).
//!    The chain is claimed first (`store::Claim`), so gc cannot remove a
//!    layer whose blob we chose not to fetch.
//! 4. `skopeo copy docker://REPO@DIGEST oci:LAYOUT:pull` fetches the rest
//!    (skopeo checks each blob's digest as it arrives);
//! 5. the layout is imported like any `oci:` source (`source::open_oci`),
//!    after checking it holds the very layers and diff IDs inspected: the
//!    placeholders are never opened, since import skips stored chains
//!    before it opens a blob; every blob read is checked again on the way.
//!
//! The layout lives in a private work directory from
//! `crate::store::staging`, removed by its guard on every way out (errors,
//! SIGINT/SIGTERM: skopeo runs through `crate::command`, which kills it
//! on a signal).
//!
//! `--creds USER[:PASS]` is never put on skopeo's command line (where
//! every local user could read it in /proc): it goes into a private
//! auth.json in the work directory, merged over `--authfile` (or
//! `REGISTRY_AUTH_FILE`) when one is given, under the reference's registry
//! only, so it is not sent to mirrors either (they take their credentials
//! from the auth file).

use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::command::Cmd;
use crate::error::{Error, Result};
use crate::store::ids::{Digest, chain_id};
use crate::store::staging::{WorkDir, Workspace};
use crate::store::{self, Store};

use super::source::{self, Descriptor, DirLayout, Image};

/// Manifests and configs are small (the registry's own limit is 4 MiB for
/// manifests).
const JSON_MAX: usize = 32 << 20;

/// The tag the pulled image gets in the work layout.
const LAYOUT_TAG: &str = "pull";

/// Registry options of `import` (only with a docker:// source).
#[derive(Clone, Debug, Default)]
pub struct RegistryOptions {
    /// `--creds USER[:PASS]`; without PASS it is read from stdin.
    pub creds: Option<String>,
    /// `--authfile FILE`.
    pub authfile: Option<PathBuf>,
    /// `--tls-verify[=BOOL]`; `None`: skopeo's default (verify, unless
    /// registries.conf marks the registry insecure).
    pub tls_verify: Option<bool>,
    /// `--cert-dir DIR`: CA certificates (*.crt) and client keys.
    pub cert_dir: Option<PathBuf>,
    /// `--platform OS/ARCH[/VARIANT]`.
    pub platform: Option<String>,
    /// `--registries-conf FILE`; else `CONTAINERS_REGISTRIES_CONF`; else
    /// skopeo's default (/etc/containers/registries.conf and .d/).
    pub registries_conf: Option<PathBuf>,
}

impl RegistryOptions {
    /// The options given, by their flags (for "only with docker://").
    pub fn given(&self) -> Vec<&'static str> {
        let mut v = vec![];
        if self.creds.is_some() {
            v.push("--creds");
        }
        if self.authfile.is_some() {
            v.push("--authfile");
        }
        if self.tls_verify.is_some() {
            v.push("--tls-verify");
        }
        if self.cert_dir.is_some() {
            v.push("--cert-dir");
        }
        if self.platform.is_some() {
            v.push("--platform");
        }
        if self.registries_conf.is_some() {
            v.push("--registries-conf");
        }
        v
    }
}

// ---------------------------------------------------------------- references

/// A docker reference, `[DOMAIN/]PATH[:TAG][@DIGEST]`, checked by the
/// grammar of distribution/reference (what skopeo parses), so a malformed
/// one is refused here with a clear message rather than by skopeo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DockerRef {
    /// The registry as written (`127.0.0.1:5000`, `quay.io`); `None`:
    /// docker.io.
    pub domain: Option<String>,
    /// The repository path as written (`library/busybox`, `busybox`).
    pub path: String,
    pub tag: Option<String>,
    pub digest: Option<Digest>,
}

impl DockerRef {
    /// `s` without the `docker://` prefix.
    pub fn parse(s: &str) -> Result<DockerRef> {
        let bad = |why: &str| Error::Usage(format!("\"docker://{s}\": {why} (want docker://[HOST[:PORT]/]PATH[:TAG][@sha256:DIGEST])"));
        if s.is_empty() {
            return Err(bad("no image reference"));
        }
        if let Some(c) = s.chars().find(|c| c.is_whitespace() || c.is_control()) {
            return Err(bad(&format!("character {c:?} not allowed")));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                let d = d
                    .strip_prefix("sha256:")
                    .and_then(Digest::from_hex)
                    .ok_or_else(|| bad(&format!("{d:?} is not a digest (sha256: and 64 lowercase hex digits)")))?;
                (r, Some(d))
            }
            None => (s, None),
        };
        // The tag is after the last ':' that is after the last '/'.
        let (name, tag) = match rest.rfind(':') {
            Some(i) if !rest[i..].contains('/') => (&rest[..i], Some(&rest[i + 1..])),
            _ => (rest, None),
        };
        if let Some(t) = tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.chars().all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                && (t.as_bytes()[0].is_ascii_alphanumeric() || t.as_bytes()[0] == b'_');
            if !ok {
                return Err(bad(&format!("{t:?} is not a tag (letters, digits, '_', '.', '-', at most 128, not starting with '.' or '-')")));
            }
        }
        if tag.is_some() && digest.is_some() {
            return Err(bad("a tag and a digest together (skopeo takes one of them)"));
        }
        if name.is_empty() {
            return Err(bad("no repository name"));
        }
        if name.len() > 255 {
            return Err(bad("repository name longer than 255 bytes"));
        }
        let (domain, path) = match name.split_once('/') {
            Some((first, p)) if first.contains(['.', ':']) || first == "localhost" || first.chars().any(|c| c.is_ascii_uppercase()) => {
                (Some(first), p)
            }
            _ => (None, name),
        };
        if let Some(d) = domain {
            check_domain(d).map_err(|why| bad(&format!("{d:?} is not a registry host: {why}")))?;
        }
        for c in path.split('/') {
            check_component(c).map_err(|why| bad(&format!("{path:?} is not a repository path: {why}")))?;
        }
        Ok(DockerRef {
            domain: domain.map(String::from),
            path: path.to_string(),
            tag: tag.map(String::from),
            digest,
        })
    }

    /// `[DOMAIN/]PATH` as written.
    pub fn repo(&self) -> String {
        match &self.domain {
            Some(d) => format!("{d}/{}", self.path),
            None => self.path.clone(),
        }
    }

    /// The registry the reference points to, as auth.json keys it.
    pub fn registry(&self) -> String {
        self.domain.clone().unwrap_or_else(|| "docker.io".to_string())
    }

    /// As written, the tag `latest` when there is neither tag nor digest:
    /// the name an import records by default.
    pub fn name(&self) -> String {
        match (&self.tag, &self.digest) {
            (_, Some(d)) => format!("{}@{d}", self.repo()),
            (Some(t), None) => format!("{}:{t}", self.repo()),
            (None, None) => format!("{}:latest", self.repo()),
        }
    }

    /// `docker://REPO@DIGEST`.
    fn pinned(&self, d: &Digest) -> String {
        format!("docker://{}@{d}", self.repo())
    }
}

impl std::fmt::Display for DockerRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "docker://{}", self.repo())?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// A repository path component: `[a-z0-9]+` joined by `.`, `_`, `__` or
/// runs of `-`.
fn check_component(c: &str) -> std::result::Result<(), String> {
    if c.is_empty() {
        return Err("empty path component".into());
    }
    if let Some(ch) = c.chars().find(|ch| !(ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(*ch))) {
        return Err(format!("character {ch:?} not allowed (lowercase letters, digits, '.', '_', '-')"));
    }
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return Err(format!("{c:?} must start and end with a letter or digit"));
    }
    // Separators between alphanumeric runs: ".", "_", "__" or "-"+.
    let mut sep = String::new();
    for &x in b {
        if alnum(x) {
            if !sep.is_empty() && !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|s| s == b'-')) {
                return Err(format!("{c:?}: separator {sep:?} not allowed"));
            }
            sep.clear();
        } else {
            sep.push(x as char);
        }
    }
    Ok(())
}

/// `host[:port]`: DNS labels or an IPv4 address, or `[IPv6]`.
fn check_domain(d: &str) -> std::result::Result<(), String> {
    let (host, port) = if let Some(r) = d.strip_prefix('[') {
        let (h, after) = r.split_once(']').ok_or("unclosed '['")?;
        if h.is_empty() || !h.chars().all(|c| c.is_ascii_hexdigit() || c == ':' || c == '.') {
            return Err("bad IPv6 address".into());
        }
        let port = match after {
            "" => None,
            a => Some(a.strip_prefix(':').ok_or("junk after ']'")?),
        };
        (None, port)
    } else {
        match d.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(d), None),
        }
    };
    if let Some(h) = host {
        for label in h.split('.') {
            let b = label.as_bytes();
            if b.is_empty() || !b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-') || b[0] == b'-' || b[b.len() - 1] == b'-' {
                return Err(format!("bad host label {label:?}"));
            }
        }
    }
    if let Some(p) = port
        && (p.is_empty() || !p.bytes().all(|x| x.is_ascii_digit()) || p.parse::<u32>().map_or(true, |n| n == 0 || n > 65535))
    {
        return Err(format!("bad port {p:?}"));
    }
    Ok(())
}

// ---------------------------------------------------------------- platforms

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Platform {
    pub os: String,
    pub arch: String,
    pub variant: Option<String>,
}

impl Platform {
    /// `OS/ARCH[/VARIANT]`.
    pub fn parse(s: &str) -> Result<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        let word = |w: &str| !w.is_empty() && w.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        match parts.as_slice() {
            [os, arch] if word(os) && word(arch) => Ok(Platform { os: os.to_string(), arch: arch.to_string(), variant: None }),
            [os, arch, v] if word(os) && word(arch) && word(v) => {
                Ok(Platform { os: os.to_string(), arch: arch.to_string(), variant: Some(v.to_string()) })
            }
            _ => Err(Error::Usage(format!("--platform {s:?}: want OS/ARCH[/VARIANT], such as linux/amd64 or linux/arm/v7"))),
        }
    }

    /// linux and this machine's architecture.
    pub fn host() -> Platform {
        Platform { os: "linux".into(), arch: source::host_arch().into(), variant: None }
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.os, self.arch)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------- documents


#[derive(Deserialize)]
struct Index {
    manifests: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(rename = "schemaVersion")]
    schema_version: u32,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    architecture: Option<String>,
    #[serde(default)]
    os: Option<String>,
    #[serde(default)]
    variant: Option<String>,
    rootfs: RootFs,
}

#[derive(Deserialize)]
struct RootFs {
    diff_ids: Vec<String>,
}

fn digest_of(s: &str, what: &str) -> Result<Digest> {
    s.strip_prefix("sha256:")
        .and_then(Digest::from_hex)
        .ok_or_else(|| Error::bad_image(what, format!("digest {s:?} is not sha256:<64 hex> (only sha256 is supported)")))
}

fn json<T: for<'de> Deserialize<'de>>(data: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(data).map_err(|e| Error::bad_image(what, format!("invalid JSON: {e}")))
}

fn is_index(data: &[u8]) -> bool {
    let v: serde_json::Value = serde_json::from_slice(data).unwrap_or_default();
    let mt = v.get("mediaType").and_then(|m| m.as_str());
    matches!(
        mt,
        Some("application/vnd.oci.image.index.v1+json") | Some("application/vnd.docker.distribution.manifest.list.v2+json")
    ) || (v.get("manifests").is_some() && v.get("layers").is_none())
}

/// The manifest for `want` among an index's; `explicit`: asked for with
/// --platform (else the default).
fn pick(idx: &Index, want: &Platform, what: &str) -> Result<Descriptor> {
    let listed = || {
        let v: Vec<String> = idx
            .manifests
            .iter()
            .filter_map(|d| d.platform.as_ref())
            .map(|p| format!("{}/{}{}", p.os, p.architecture, p.variant.as_deref().map(|v| format!("/{v}")).unwrap_or_default()))
            .collect();
        if v.is_empty() { "none stated".into() } else { v.join(", ") }
    };
    let matching: Vec<&Descriptor> = idx
        .manifests
        .iter()
        .filter(|d| {
            d.platform.as_ref().is_some_and(|p| {
                p.os == want.os && p.architecture == want.arch && (want.variant.is_none() || p.variant == want.variant)
            })
        })
        .collect();
    match matching.as_slice() {
        [one] => Ok((*one).clone()),
        [] => Err(Error::bad_image(what, format!("no image for {want} (the index has: {})", listed()))),
        several => {
            // Several variants and none asked for: the one without a
            // variant if there is one, else refuse to guess.
            let plain: Vec<&&Descriptor> = several.iter().filter(|d| d.platform.as_ref().is_some_and(|p| p.variant.is_none())).collect();
            match plain.as_slice() {
                [one] => Ok((**one).clone()),
                _ => Err(Error::bad_image(what, format!("{} images for {want} (the index has: {}); choose one with --platform OS/ARCH/VARIANT", several.len(), listed()))),
            }
        }
    }
}

// ---------------------------------------------------------------- skopeo

/// What every skopeo run gets: the auth file, TLS options.
struct Skopeo<'a> {
    opts: &'a RegistryOptions,
    /// The auth file to pass (ours with --creds, else --authfile).
    authfile: Option<PathBuf>,
    /// registries.conf to pass, if not skopeo's default.
    registries_conf: Option<PathBuf>,
    work: &'a Path,
    reference: String,
}

impl Skopeo<'_> {
    fn cmd(&self, sub: &str, src_prefix: bool) -> Cmd {
        let mut c = Cmd::new("skopeo");
        // Its temporary files stay in our work directory.
        c.arg("--tmpdir").arg(self.work.join("tmp"));
        // skopeo before 1.10 reads no CONTAINERS_REGISTRIES_CONF: the file
        // goes as its (global, hidden) option, which later ones still take.
        if let Some(r) = &self.registries_conf {
            c.arg("--registries-conf").arg(r);
        }
        c.arg(sub);
        let flag = |f: &str| if src_prefix { format!("--src-{f}") } else { format!("--{f}") };
        if let Some(a) = &self.authfile {
            c.arg(flag("authfile")).arg(a);
        }
        if let Some(v) = self.opts.tls_verify {
            c.arg(format!("{}={v}", flag("tls-verify")));
        }
        if let Some(d) = &self.opts.cert_dir {
            c.arg(flag("cert-dir")).arg(d);
        }
        c.current_dir(self.work);
        c
    }

    /// `skopeo inspect --raw [--config] IMAGE`: the document's bytes.
    fn inspect(&self, image: &str, config: bool, what: &str) -> Result<Vec<u8>> {
        let mut c = self.cmd("inspect", false);
        c.arg("--raw");
        if config {
            c.arg("--config");
        }
        c.arg(image);
        let out = run(&mut c, &format!("{}: {what}", self.reference))?;
        if out.len() > JSON_MAX {
            return Err(Error::bad_image(self.reference.to_string(), format!("{what}: {} bytes, more than the {JSON_MAX} expected", out.len())));
        }
        Ok(out)
    }
}

/// Run; its stdout. A failure names what was done, the command and what
/// skopeo said.
fn run(c: &mut Cmd, what: &str) -> Result<Vec<u8>> {
    c.run_stdout(what, skopeo_message)
}

/// `time="..." level=fatal msg="Error ...: reading manifest x in y: manifest unknown"`
/// -> the message; other output: its last lines.
fn skopeo_message(stderr: &str) -> String {
    let fatal = stderr.lines().rev().find_map(|l| {
        let i = l.find("msg=\"")?;
        l.contains("level=fatal").then(|| &l[i + 5..])
    });
    match fatal {
        Some(m) => {
            let m = m.strip_suffix('"').unwrap_or(m);
            m.replace("\\\"", "\"").replace("\\\\", "\\")
        }
        None => crate::command::tail(stderr, 3),
    }
}

/// The copy, with a progress bar on a terminal: the bytes skopeo has
/// written into the layout so far (allocated blocks, so the sparse
/// placeholders count for nothing) against the bytes to fetch.
fn fetch(c: &mut Cmd, what: &str, layout: &Path, total: u64, quiet: bool) -> Result<Vec<u8>> {
    use std::sync::atomic::{AtomicBool, Ordering};
    if quiet || !std::io::stderr().is_terminal() {
        return run(c, what);
    }
    let bar = indicatif::ProgressBar::with_draw_target(Some(total), indicatif::ProgressDrawTarget::stderr());
    bar.set_style(
        indicatif::ProgressStyle::with_template("{prefix:.bold} [{bar:25}] {bytes}/{total_bytes} {bytes_per_sec} {wide_msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix("fetching");
    bar.set_message("layers not in the store");
    let done = AtomicBool::new(false);
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                bar.set_position(allocated(layout).min(total));
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
        });
        let r = run(c, what);
        done.store(true, Ordering::Relaxed);
        r
    });
    bar.finish_and_clear();
    r
}

/// Bytes allocated to the regular files below `dir`.
fn allocated(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut sum = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) if m.is_file() => sum += m.blocks() * 512,
                _ => {}
            }
        }
    }
    sum
}

// ---------------------------------------------------------------- credentials

fn base64(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for ch in data.chunks(3) {
        let b = [ch[0], *ch.get(1).unwrap_or(&0), *ch.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            out.push(if i <= ch.len() { A[(n >> shift) as usize & 63] as char } else { '=' });
        }
    }
    out
}

/// USER and PASS of `--creds USER[:PASS]`; without PASS one line is read
/// from stdin (without echo on a terminal), as podman does.
fn credentials(creds: &str) -> Result<(String, String)> {
    let (user, pass) = match creds.split_once(':') {
        Some((u, p)) => (u.to_string(), p.to_string()),
        None => (creds.to_string(), read_password(creds)?),
    };
    if user.is_empty() {
        return Err(Error::Usage("--creds: empty user name (want USER[:PASS])".into()));
    }
    Ok((user, pass))
}

fn read_password(user: &str) -> Result<String> {
    let stdin = std::io::stdin();
    let tty = stdin.is_terminal();
    // Echo off while the password is typed; restored by the guard.
    struct Echo(Option<rustix::termios::Termios>);
    impl Drop for Echo {
        fn drop(&mut self) {
            if let Some(t) = &self.0 {
                let _ = rustix::termios::tcsetattr(std::io::stdin(), rustix::termios::OptionalActions::Now, t);
            }
        }
    }
    let _echo = if tty {
        eprint!("Password for {user}: ");
        let _ = std::io::stderr().flush();
        let old = rustix::termios::tcgetattr(&stdin).map_err(|e| Error::sys("--creds: read terminal settings", "/dev/stdin", e))?;
        let mut quiet = old.clone();
        quiet.local_modes.remove(rustix::termios::LocalModes::ECHO);
        rustix::termios::tcsetattr(&stdin, rustix::termios::OptionalActions::Now, &quiet)
            .map_err(|e| Error::sys("--creds: turn off echo", "/dev/stdin", e))?;
        Echo(Some(old))
    } else {
        Echo(None)
    };
    let mut line = String::new();
    let n = stdin.lock().read_line(&mut line).map_err(|e| Error::io("--creds: read the password", "/dev/stdin", &e))?;
    if tty {
        eprintln!();
    }
    if n == 0 {
        return Err(Error::Usage(format!("--creds {user}: no password given (USER:PASS, or the password on stdin)")));
    }
    Ok(line.trim_end_matches(['\n', '\r']).to_string())
}

/// The auth file skopeo gets: with --creds a private one in `work` (the
/// given or $REGISTRY_AUTH_FILE one's entries, and ours for `registry`
/// over them); else --authfile as given (checked readable), or none
/// (skopeo's defaults).
fn auth_file(opts: &RegistryOptions, registry: &str, work: &Path) -> Result<Option<PathBuf>> {
    let base = opts
        .authfile
        .clone()
        .or_else(|| std::env::var_os("REGISTRY_AUTH_FILE").filter(|v| !v.is_empty()).map(PathBuf::from));
    let read_base = |p: &Path| -> Result<serde_json::Value> {
        let data = std::fs::read(p).map_err(|e| Error::io("--authfile: read", p, &e))?;
        serde_json::from_slice::<serde_json::Value>(&data)
            .ok()
            .filter(|v| v.is_object())
            .ok_or_else(|| Error::bad_image(p.display().to_string(), "not an auth.json file (want a JSON object with \"auths\")"))
    };
    let Some(creds) = &opts.creds else {
        if let Some(p) = &opts.authfile {
            read_base(p)?;
        }
        return Ok(opts.authfile.clone());
    };
    let (user, pass) = credentials(creds)?;
    let mut doc = match &base {
        Some(p) if opts.authfile.is_some() || p.exists() => read_base(p)?,
        _ => serde_json::json!({}),
    };
    if !doc.get("auths").is_some_and(|a| a.is_object()) {
        doc["auths"] = serde_json::json!({});
    }
    doc["auths"][registry] = serde_json::json!({ "auth": base64(format!("{user}:{pass}").as_bytes()) });
    // A credential helper for this registry would be asked before our
    // entry: --creds wins.
    if let Some(h) = doc.get_mut("credHelpers").and_then(|h| h.as_object_mut()) {
        h.remove(registry);
    }
    let p = work.join("auth.json");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&p)
        .map_err(|e| Error::io("create", &p, &e))?;
    f.write_all(doc.to_string().as_bytes()).map_err(|e| Error::io("write", &p, &e))?;
    Ok(Some(p))
}

// ---------------------------------------------------------------- the pull

/// What `pull` leaves for the import: the image (in the work layout) and
/// the work directory and claim holding it.
pub struct Pulled {
    pub image: Image,
    pub work: WorkDir,
    /// On the image's chain, from before the store was looked at: gc
    /// keeps the layers whose blobs were not fetched.
    pub claim: store::Claim,
}

/// Fetch what the store lacks of `r` into a node-local OCI layout; the
/// image is then imported from it as any oci: source.
pub fn pull(store: &Store, ws: &Workspace, r: &DockerRef, opts: &RegistryOptions, quiet: bool) -> Result<Pulled> {
    let what = r.to_string();
    let explicit = opts.platform.as_deref().map(Platform::parse).transpose()?;
    let want = explicit.clone().unwrap_or_else(Platform::host);
    if let Some(d) = &opts.cert_dir {
        let m = std::fs::metadata(d).map_err(|e| Error::io(format!("{what}: --cert-dir"), d, &e))?;
        if !m.is_dir() {
            return Err(Error::Usage(format!("{what}: --cert-dir {}: not a directory", d.display())));
        }
    }
    let work = ws.create("import-pull")?;
    for sub in ["tmp", "oci"] {
        let p = work.path.join(sub);
        std::fs::create_dir(&p).map_err(|e| Error::io("create", &p, &e))?;
    }
    let registries_conf = opts
        .registries_conf
        .clone()
        .or_else(|| std::env::var_os("CONTAINERS_REGISTRIES_CONF").filter(|v| !v.is_empty()).map(PathBuf::from));
    if let Some(p) = &registries_conf {
        // skopeo would take a missing file for an empty configuration.
        std::fs::File::open(p).map_err(|e| Error::io(format!("{what}: registries.conf: open"), p, &e))?;
    }
    let sk = Skopeo {
        opts,
        authfile: auth_file(opts, &r.registry(), &work.path).map_err(|e| e.context(&what))?,
        registries_conf,
        work: &work.path,
        reference: what.clone(),
    };

    // 1. The manifest, through an index if it is one; pinned by digest.
    let first = match r.digest {
        Some(d) => r.pinned(&d),
        None => format!("docker://{}", r.name()),
    };
    let mut data = sk.inspect(&first, false, "read the manifest")?;
    let mut digest = Digest::of_bytes(&data);
    if let Some(d) = r.digest
        && d != digest
    {
        return Err(Error::bad_image(what, format!("the registry sent a manifest whose digest is {digest}")));
    }
    let from_index = is_index(&data);
    if from_index {
        let idx: Index = json(&data, &format!("{what}: index {digest}"))?;
        let d = pick(&idx, &want, &what)?;
        let md = digest_of(&d.digest, &format!("{what}: index {digest}"))?;
        data = sk.inspect(&r.pinned(&md), false, &format!("read the manifest for {want}"))?;
        let got = Digest::of_bytes(&data);
        if got != md {
            return Err(Error::bad_image(what, format!("manifest {md}: the registry sent content whose digest is {got}")));
        }
        if is_index(&data) {
            return Err(Error::bad_image(what, format!("the index's entry for {want} is another index")));
        }
        digest = md;
    }
    let manifest: Manifest = json(&data, &format!("{what}: manifest {digest}"))?;
    if manifest.schema_version != 2 {
        return Err(Error::bad_image(what, format!("manifest schema version {} (only 2 is supported)", manifest.schema_version)));
    }
    let pinned = r.pinned(&digest);

    // 2. The config: the diff IDs, and the platform of a single image.
    let cfg_data = sk.inspect(&pinned, true, "read the config")?;
    let cfg_digest = digest_of(&manifest.config.digest, &format!("{what}: config"))?;
    if Digest::of_bytes(&cfg_data) != cfg_digest {
        return Err(Error::mismatch(format!("{what}: config"), "digest", format!("the manifest says {cfg_digest}"), format!("skopeo gave {}", Digest::of_bytes(&cfg_data))));
    }
    let config: Config = json(&cfg_data, &format!("{what}: config {cfg_digest}"))?;
    let image_platform = Platform {
        os: config.os.clone().unwrap_or_default(),
        arch: config.architecture.clone().unwrap_or_default(),
        variant: config.variant.clone(),
    };
    // The index's entry was chosen for its platform; a single image is
    // checked by its config (the variant only where both state one).
    let differs = image_platform.os != want.os
        || image_platform.arch != want.arch
        || (want.variant.is_some() && image_platform.variant.is_some() && image_platform.variant != want.variant);
    if !from_index && differs {
        if explicit.is_some() {
            return Err(Error::bad_image(what, format!("the image is for {image_platform}, not the {want} asked for")));
        }
        log::warn!("{what}: the image is for {image_platform}, this machine is {want}");
        if !quiet {
            eprintln!("sharedloop: warning: {what} is an image for {image_platform}, this machine is {want}");
        }
    }
    let diff_ids = config
        .rootfs
        .diff_ids
        .iter()
        .enumerate()
        .map(|(i, d)| digest_of(d, &format!("{what}: config diff ID {}", i + 1)))
        .collect::<Result<Vec<_>>>()?;
    if diff_ids.len() != manifest.layers.len() {
        return Err(Error::bad_image(what, format!("manifest has {} layers but the config {} diff IDs", manifest.layers.len(), diff_ids.len())));
    }
    // What import would refuse is refused before anything is downloaded.
    let n = manifest.layers.len();
    if n == 0 {
        return Err(Error::bad_image(what, "the image has no layers"));
    }
    if n > store::MAX_LAYERS {
        return Err(Error::bad_image(what, format!("{n} layers; overlayfs mounts at most {}, so the image could never be mounted", store::MAX_LAYERS)));
    }
    let blobs = manifest
        .layers
        .iter()
        .enumerate()
        .map(|(i, l)| {
            let d = digest_of(&l.digest, &format!("{what}: layer {}", i + 1))?;
            source::check_media_type(l.media_type.as_deref(), &format!("{what}: layer {} ({d})", i + 1))?;
            Ok(d)
        })
        .collect::<Result<Vec<_>>>()?;

    // 3. Claim the chain, then plant a placeholder for each blob whose
    //    every layer is stored (a blob used twice, once by a missing
    //    chain, must be fetched).
    let chains: Vec<Digest> = diff_ids
        .iter()
        .scan(None, |p: &mut Option<Digest>, d| {
            let c = chain_id(p.as_ref(), d);
            *p = Some(c);
            Some(c)
        })
        .collect();
    let claim = store::Claim::create(store, &chains)?;
    let mut stored = vec![false; chains.len()];
    for (i, c) in chains.iter().enumerate() {
        stored[i] = store.has_layer(c)?.is_some();
    }
    let layout = work.path.join("oci");
    let blob_dir = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blob_dir).map_err(|e| Error::io("create", &blob_dir, &e))?;
    let mut skipped = 0;
    let mut fetch_bytes = 0u64;
    for (i, b) in blobs.iter().enumerate() {
        let all_stored = blobs.iter().zip(&stored).filter(|(x, _)| *x == b).all(|(_, s)| *s);
        if !all_stored {
            fetch_bytes += manifest.layers[i].size;
            continue;
        }
        skipped += 1;
        let p = blob_dir.join(b.hex());
        if p.exists() {
            continue;
        }
        // Sparse, of the blob's size: skopeo records the size of a blob it
        // reuses from the file it finds.
        let f = std::fs::File::create_new(&p).map_err(|e| Error::io("create placeholder", &p, &e))?;
        f.set_len(manifest.layers[i].size).map_err(|e| Error::io("size placeholder", &p, &e))?;
    }
    log::info!("{what}: manifest {digest}, {n} layers, {skipped} already stored, {} to fetch", n - skipped);
    if !quiet {
        eprintln!(
            "{what}: {digest}, {n} layer{}, {skipped} already in the store; fetching {} ({})",
            if n == 1 { "" } else { "s" },
            n - skipped,
            super::progress::mib(fetch_bytes)
        );
    }

    // 4. Fetch the rest, pinned to the manifest inspected.
    crate::interrupt::step("pull-copy", None)?;
    let mut c = sk.cmd("copy", true);
    c.args(["--quiet", "--remove-signatures"]);
    c.arg(&pinned).arg(format!("oci:oci:{LAYOUT_TAG}"));
    fetch(&mut c, &format!("{what}: fetch the layers"), &layout, fetch_bytes, quiet)?;
    crate::interrupt::step("pull-fetched", None)?;

    // 5. The layout must hold the image inspected, layer for layer.
    let layout_what = format!("{what} (fetched to {})", layout.display());
    let image = source::open_oci(Box::new(DirLayout { root: layout.clone() }), Some(LAYOUT_TAG), &layout_what)?;
    let got: Vec<(Option<Digest>, Digest)> = image.layers.iter().map(|l| (l.digest, l.diff_id)).collect();
    let want_layers: Vec<(Option<Digest>, Digest)> = blobs.iter().map(|b| Some(*b)).zip(diff_ids.iter().copied()).collect();
    if got != want_layers {
        return Err(Error::bad_image(layout_what, format!("skopeo wrote other layers than the manifest {digest} lists")));
    }
    let image = Image { reference: Some(r.name()), ..image };
    Ok(Pulled { image, work, claim })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let d = "sha256:".to_string() + &"ab".repeat(32);
        let ok: &[(&str, Option<&str>, &str, Option<&str>, bool, &str)] = &[
            ("busybox", None, "busybox", None, false, "busybox:latest"),
            ("busybox:1.36", None, "busybox", Some("1.36"), false, "busybox:1.36"),
            ("library/busybox", None, "library/busybox", None, false, "library/busybox:latest"),
            ("127.0.0.1:5000/x/y:t", Some("127.0.0.1:5000"), "x/y", Some("t"), false, "127.0.0.1:5000/x/y:t"),
            ("localhost/a", Some("localhost"), "a", None, false, "localhost/a:latest"),
            ("quay.io/a-b/c__d.e", Some("quay.io"), "a-b/c__d.e", None, false, "quay.io/a-b/c__d.e:latest"),
            ("[::1]:5000/a:_x", Some("[::1]:5000"), "a", Some("_x"), false, "[::1]:5000/a:_x"),
        ];
        for (s, dom, path, tag, dig, name) in ok {
            let r = DockerRef::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!((r.domain.as_deref(), r.path.as_str(), r.tag.as_deref(), r.digest.is_some()), (*dom, *path, *tag, *dig), "{s}");
            assert_eq!(r.name(), *name);
            assert_eq!(r.to_string(), format!("docker://{s}"));
        }
        let r = DockerRef::parse(&format!("x/y@{d}")).unwrap();
        assert_eq!(r.name(), format!("x/y@{d}"));
        assert_eq!(r.registry(), "docker.io");
        for bad in [
            "",
            "Busybox",
            "a/B",
            "a:",
            "a:-x",
            "a:.x",
            "a b",
            "a//b",
            "a/",
            "/a",
            "-a",
            "a-",
            "a..b",
            "a___b",
            "host:port/a",
            "host:0/a",
            "host:99999/a",
            "-host.x/a",
            "a@sha256:12",
            "a@md5:00",
            "a:1@sha256:abababababababababababababababababababababababababababababababab",
            "a:\u{1}",
            "a:t/b",
            "[::1/a",
        ] {
            assert!(DockerRef::parse(bad).is_err(), "{bad:?} accepted: {:?}", DockerRef::parse(bad));
        }
        let e = DockerRef::parse("Busybox").unwrap_err().to_string();
        assert!(e.contains("docker://Busybox") && e.contains("not allowed"), "{e}");
        assert!(DockerRef::parse(&"a".repeat(256)).is_err());
    }

    #[test]
    fn platforms_and_picking() {
        assert_eq!(Platform::parse("linux/arm/v7").unwrap().to_string(), "linux/arm/v7");
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
        let desc = |arch: &str, v: Option<&str>, dg: char| Descriptor {
            media_type: None,
            digest: format!("sha256:{}", dg.to_string().repeat(64)),
            size: 1,
            annotations: None,
            platform: Some(source::DescPlatform { architecture: arch.into(), os: "linux".into(), variant: v.map(String::from) }),
        };
        let idx = Index { manifests: vec![desc("amd64", None, 'a'), desc("arm", Some("v6"), 'b'), desc("arm", Some("v7"), 'c')] };
        let p = |s: &str| Platform::parse(s).unwrap();
        assert!(pick(&idx, &p("linux/amd64"), "t").unwrap().digest.ends_with('a'));
        assert!(pick(&idx, &p("linux/arm/v7"), "t").unwrap().digest.ends_with('c'));
        let e = pick(&idx, &p("linux/arm"), "t").unwrap_err().to_string();
        assert!(e.contains("choose one with --platform"), "{e}");
        let e = pick(&idx, &p("linux/s390x"), "t").unwrap_err().to_string();
        assert!(e.contains("no image for linux/s390x") && e.contains("linux/arm/v6"), "{e}");
    }

    #[test]
    fn base64_and_messages() {
        for (a, b) in [("", ""), ("f", "Zg=="), ("fo", "Zm8="), ("foo", "Zm9v"), ("alice:s3cret", "YWxpY2U6czNjcmV0")] {
            assert_eq!(base64(a.as_bytes()), b);
        }
        let s = "time=\"2026-12-07T11:21:25Z\" level=fatal msg=\"Error parsing image name \\\"docker://a\\\": manifest unknown\"\n";
        assert_eq!(skopeo_message(s), "Error parsing image name \"docker://a\": manifest unknown");
        assert_eq!(skopeo_message("a\nb\n\nc\nd\n"), "b; c; d");
    }
}
