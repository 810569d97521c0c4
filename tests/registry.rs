//! `sharedloop import docker://REF`: pulls from Debian's reference
//! registry (`docker-registry`), started here on 127.0.0.1 with a free
//! port and its storage in the test's directory — one instance without
//! authentication over plain HTTP, one with htpasswd (bcrypt) users over
//! TLS with a certificate made here by openssl. Images are built with
//! umoci and pushed with skopeo; every pull is mounted and compared with
//! umoci's own unpack of the image.
//!
//! What is downloaded is read from the registry's access log (one line per
//! request): a layer already in the store must never be fetched again.
//!
//! Every command runs with its own registries.conf, auth file location and
//! HOME, so nothing of the machine's containers configuration leaks in.
//! Registries are killed and reaped by their guard at the end of the test.

mod common;
use common::tree::assert_same_tree;
use common::*;
use common::registry::*;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

// ================================================================ tools



fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}


fn base64(s: &str) -> String {
    const A: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let d = s.as_bytes();
    let mut out = String::new();
    for c in d.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            out.push(if i <= c.len() { A[(n >> (18 - 6 * i)) as usize & 63] as char } else { '=' });
        }
    }
    out
}


// ================================================================ images

/// Layout `L` with `base` (two layers: every file type, setuid, owners,
/// xattrs, hardlinks, 1 MB of random data; then changes and a deletion)
/// and `derived` (base plus one layer), umoci's unpack of each in
/// `EXP-base`, `EXP-derived`, and their blobs.
const UMOCI_SCRIPT: &str = r#"set -eu
umoci init --layout L
umoci new --image L:base
umoci unpack --image L:base B >/dev/null
r=B/rootfs
mkdir -p $r/etc $r/bin $r/data $r/tmp
chmod 1777 $r/tmp
printf 'root:x:0:0\n' > $r/etc/passwd
setfattr -n user.k -v v $r/etc/passwd
printf 'suid' > $r/bin/suid; chown 1000:1001 $r/bin/suid; chmod 4755 $r/bin/suid
printf 'a' > $r/bin/a; ln $r/bin/a $r/bin/b; ln $r/bin/a $r/bin/c; ln -s ../etc/passwd $r/bin/rel
mkfifo $r/fifo; mknod $r/null c 1 3
head -c 1000000 /dev/urandom > $r/data/random.bin
umoci repack --refresh-bundle --image L:base B
rm $r/bin/c; printf 'second' > $r/data/two; chmod 600 $r/etc/passwd
umoci repack --refresh-bundle --image L:base B
umoci unpack --image L:base EXP-base >/dev/null
printf 'derived' > $r/data/three; rm $r/data/random.bin
umoci repack --image L:derived B
umoci unpack --image L:derived EXP-derived >/dev/null
rm -rf B
"#;

struct Images {
    dir: PathBuf,
}

impl Images {
    fn build(env: &Env) -> Images {
        need("umoci");
        let dir = env.dir.join("images");
        std::fs::create_dir_all(&dir).unwrap();
        sh(UMOCI_SCRIPT, &dir);
        Images { dir }
    }
    fn layout(&self) -> PathBuf {
        self.dir.join("L")
    }
    fn expected(&self, tag: &str) -> PathBuf {
        self.dir.join(format!("EXP-{tag}/rootfs"))
    }
    /// (config digest, layer digests, top chain ID) of a tag.
    fn docs(&self, tag: &str) -> (String, Vec<String>, String) {
        let l = self.layout();
        let j = |p: PathBuf| -> serde_json::Value { serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap() };
        let blob = |d: &str| l.join("blobs/sha256").join(d.strip_prefix("sha256:").unwrap());
        let idx = j(l.join("index.json"));
        let m = idx["manifests"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
            .unwrap()
            .clone();
        let man = j(blob(m["digest"].as_str().unwrap()));
        let cfg_digest = man["config"]["digest"].as_str().unwrap().to_string();
        let cfg = j(blob(&cfg_digest));
        let layers = man["layers"].as_array().unwrap().iter().map(|l| l["digest"].as_str().unwrap().to_string()).collect();
        let diffs: Vec<String> = cfg["rootfs"]["diff_ids"].as_array().unwrap().iter().map(|d| d.as_str().unwrap().to_string()).collect();
        let mut chain = diffs[0].clone();
        for d in &diffs[1..] {
            chain = format!("sha256:{}", common::tree::sha256_hex(format!("{chain} {d}").as_bytes()));
        }
        (cfg_digest, layers, chain)
    }
}

// ================================================================ running


fn import(env: &Env, source: &str, extra: &[&str]) -> Run {
    let a = import_args(env, source, extra);
    env.run(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

#[track_caller]
fn import_ok(env: &Env, source: &str, extra: &[&str]) -> (String, String) {
    let r = import(env, source, extra);
    r.ok();
    (r.stdout.trim().to_string(), r.stderr.clone())
}

fn names(store: &Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(store.join("names"))
        .map(|r| {
            r.flatten()
                .map(|e| (e.file_name().to_string_lossy().replace("%2F", "/"), std::fs::read_to_string(e.path()).unwrap().trim().to_string()))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn layer_count(env: &Env) -> usize {
    [&env.root, &env.fallback]
        .iter()
        .map(|s| std::fs::read_dir(s.join("layers")).map(|r| r.count()).unwrap_or(0))
        .sum()
}

/// Nothing in either store's tmp/ (work layouts, staging, claims).
fn assert_no_staging(env: &Env) {
    for s in [&env.root, &env.fallback] {
        let left: Vec<_> = std::fs::read_dir(s.join("tmp")).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "left in {}: {left:?}", s.display());
    }
}

/// Mount `name`, compare with `want`, unmount.
fn mount_and_compare(env: &Env, name: &str, want: &Path) {
    let m = env.mnt("m");
    env.run(&["mount", "-t", "sharedloop", name, m.to_str().unwrap(), "-o", &env.store_opts()]).ok();
    assert_same_tree(&env.view(&m), want);
    env.run(&["umount", m.to_str().unwrap()]).ok();
}

/// A failed pull: exit 32, the reference and `frags` in the message, and
/// nothing stored or staged.
#[track_caller]
fn assert_pull_fails(env: &Env, r: &Run, reference: &str, frags: &[&str]) {
    assert_eq!(r.code, 32, "want exit 32: {r:?}");
    assert!(r.stderr.contains(reference), "the error names {reference}: {}", r.stderr);
    for f in frags {
        assert!(r.stderr.contains(f), "stderr lacks {f:?}: {}", r.stderr);
    }
    assert!(r.stdout.is_empty(), "{r:?}");
    assert_eq!(layer_count(env), 0, "nothing stored");
    assert!(names(&env.root).is_empty() && names(&env.fallback).is_empty());
    assert_no_staging(env);
}

/// A failed pull in a store that has layers already: exit 32, the
/// reference and `frags` in the message.
#[track_caller]
fn assert_pull_fails_keeping(r: &Run, reference: &str, frags: &[&str]) {
    assert_eq!(r.code, 32, "want exit 32: {r:?}");
    for f in [reference].iter().chain(frags) {
        assert!(r.stderr.contains(f), "stderr lacks {f:?}: {}", r.stderr);
    }
}

/// `import` started with the failpoint `stop:pull-copy`, once it has
/// stopped there (manifest and config read, nothing fetched); its stderr
/// so far, and the rest of it still to read.
fn spawn_stopped(env: &Env, src: &str, extra: &[&str]) -> (Child, BufReader<std::process::ChildStderr>, String) {
    let a = import_args(env, src, extra);
    let mut c = env.command(&a.iter().map(String::as_str).collect::<Vec<_>>());
    c.env("SHAREDLOOP_FAILPOINT", "stop:pull-copy").stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut k = c.spawn().unwrap();
    let mut err = BufReader::new(k.stderr.take().unwrap());
    let mut seen = String::new();
    while !seen.contains("stopped at pull-copy") {
        assert!(err.read_line(&mut seen).unwrap() > 0, "ended early: {seen}");
    }
    // It prints, then stops itself: a SIGCONT before that would be lost.
    let t = Instant::now();
    while !std::fs::read_to_string(format!("/proc/{}/stat", k.id())).unwrap().rsplit_once(')').unwrap().1.trim_start().starts_with('T') {
        assert!(t.elapsed() < Duration::from_secs(10), "the import did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
    (k, err, seen)
}

fn cont(k: &Child) {
    rustix::process::kill_process(rustix::process::Pid::from_raw(k.id() as i32).unwrap(), rustix::process::Signal::CONT).unwrap();
}

// ================================================================ tests

#[test]
fn pull_mounts_the_image_and_never_downloads_a_stored_layer() {
    let mut env = Env::new("reg-pull");
    isolate(&mut env, "");
    let img = Images::build(&env);
    let reg = Registry::start(&env, "open", false);
    reg.push(&img.layout(), "base", "t/img:base", false);
    reg.push(&img.layout(), "derived", "t/img:derived", false);
    let (base_cfg, base_layers, base_chain) = img.docs("base");
    let (der_cfg, der_layers, der_chain) = img.docs("derived");
    assert_eq!(der_layers[..2], base_layers[..], "derived shares base's two layers");

    let mark = reg.mark();
    let src = format!("docker://{}/t/img:base", reg.host());
    let (id, err) = import_ok(&env, &src, &["--tls-verify=false"]);
    assert_eq!(id, base_chain);
    assert!(err.contains(&format!("{src}: sha256:")) && err.contains("2 layers, 0 already in the store"), "{err}");
    assert!(err.contains("layer 2/2 sha256:"), "the usual progress lines: {err}");
    let gets = reg.blob_gets("t/img", mark);
    let want: std::collections::BTreeMap<String, usize> = base_layers.iter().chain([&base_cfg]).map(|d| (d.clone(), 1)).collect();
    // The config is read twice (inspect, then copy); each layer once.
    let mut want = want;
    *want.get_mut(&base_cfg).unwrap() = 2;
    assert_eq!(gets, want, "blob downloads of the first pull");
    // Named by the reference's repo:tag.
    let name = format!("{}/t/img:base", reg.host());
    assert_eq!(names(&env.root), vec![(name.clone(), base_chain.clone())]);
    mount_and_compare(&env, &name, &img.expected("base"));

    // The derived image: only its own layer comes over the wire.
    let mark = reg.mark();
    let src = format!("docker://{}/t/img:derived", reg.host());
    let (id, err) = import_ok(&env, &src, &["--tls-verify=false", "--name", "derived"]);
    assert_eq!(id, der_chain);
    assert!(err.contains("3 layers, 2 already in the store; fetching 1"), "{err}");
    assert_eq!(err.matches("already in the root store").count(), 2, "{err}");
    let gets = reg.blob_gets("t/img", mark);
    let want: std::collections::BTreeMap<String, usize> = [(der_layers[2].clone(), 1), (der_cfg.clone(), 2)].into_iter().collect();
    assert_eq!(gets, want, "the second pull downloads the new layer only");
    mount_and_compare(&env, "derived", &img.expected("derived"));

    // Once more: no layer at all, and --quiet says nothing.
    let mark = reg.mark();
    let r = import(&env, &src, &["--tls-verify=false", "--name", "again", "-q"]);
    r.ok();
    assert_eq!(r.stderr, "", "quiet");
    let gets = reg.blob_gets("t/img", mark);
    assert!(der_layers.iter().all(|l| !gets.contains_key(l)), "{gets:?}");
    assert_eq!(layer_count(&env), 3);
    assert_no_staging(&env);
    env.assert_clean();
}

#[test]
fn authentication_by_creds_authfile_and_stdin_and_tls() {
    let mut env = Env::new("reg-auth");
    isolate(&mut env, "");
    let img = Images::build(&env);
    let reg = Registry::start(&env, "auth", true);
    reg.push(&img.layout(), "base", "t/img:base", false);
    let (_, _, chain) = img.docs("base");
    let src = format!("docker://{}/t/img:base", reg.host());
    let certs = reg.certs().display().to_string();

    // No credentials, then a wrong password: 401, nothing stored; the
    // password is nowhere in the message.
    let r = import(&env, &src, &["--cert-dir", &certs]);
    assert_pull_fails(&env, &r, &src, &["read the manifest", "unauthorized"]);
    let r = import(&env, &src, &["--cert-dir", &certs, "--creds", &format!("{USER}:wrong-pw")]);
    assert_pull_fails(&env, &r, &src, &["unauthorized"]);
    assert!(!r.stderr.contains("wrong-pw"), "the password leaked: {}", r.stderr);

    // The certificate is checked: unknown without --cert-dir; not checked
    // with --tls-verify=false.
    let creds = format!("{USER}:{PASS}");
    let r = import(&env, &src, &["--creds", &creds]);
    assert_pull_fails(&env, &r, &src, &["certificate"]);
    assert!(!r.stderr.contains(PASS), "{}", r.stderr);
    let (id, _) = import_ok(&env, &src, &["--creds", &creds, "--tls-verify=false", "--name", "noverify"]);
    assert_eq!(id, chain);

    // --creds with --cert-dir; the password never on skopeo's command line
    // (the error above shows the command: no password in it).
    let (id, _) = import_ok(&env, &src, &["--creds", &creds, "--cert-dir", &certs, "--name", "creds"]);
    assert_eq!(id, chain);
    mount_and_compare(&env, "creds", &img.expected("base"));

    // --creds USER: the password from stdin.
    let a = import_args(&env, &src, &["--creds", USER, "--cert-dir", &certs, "--name", "stdin"]);
    let mut c = env.command(&a.iter().map(String::as_str).collect::<Vec<_>>());
    c.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut k = c.spawn().unwrap();
    writeln!(k.stdin.take().unwrap(), "{PASS}").unwrap();
    let out = k.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), chain);

    // --authfile, in podman's format; and the same file as the default
    // (REGISTRY_AUTH_FILE) with no option at all.
    let auth = format!(r#"{{"auths": {{"{}": {{"auth": "{}"}}}}}}"#, reg.host(), base64(&creds));
    let file = env.dir.join("my-auth.json");
    std::fs::write(&file, &auth).unwrap();
    let (id, _) = import_ok(&env, &src, &["--authfile", file.to_str().unwrap(), "--cert-dir", &certs, "--name", "authfile"]);
    assert_eq!(id, chain);
    std::fs::write(env.dir.join("home/auth.json"), &auth).unwrap();
    let (id, _) = import_ok(&env, &src, &["--cert-dir", &certs, "--name", "default-auth"]);
    assert_eq!(id, chain);
    // --creds over an --authfile whose entry for the registry is wrong:
    // --creds wins.
    let stale = env.dir.join("stale-auth.json");
    std::fs::write(&stale, format!(r#"{{"auths": {{"{}": {{"auth": "{}"}}}}}}"#, reg.host(), base64("alice:old-pw"))).unwrap();
    let r = import(&env, &src, &["--authfile", stale.to_str().unwrap(), "--cert-dir", &certs]);
    assert_pull_fails_keeping(&r, &src, &["unauthorized"]);
    let (id, _) = import_ok(&env, &src, &["--authfile", stale.to_str().unwrap(), "--creds", &creds, "--cert-dir", &certs, "--name", "creds-over"]);
    assert_eq!(id, chain);
    // An auth file that cannot be read, or is no auth file.
    let r = import(&env, &src, &["--authfile", "/nonexistent/auth.json", "--cert-dir", &certs]);
    assert_eq!(r.code, 32, "{r:?}");
    assert!(r.stderr.contains("--authfile: read: /nonexistent/auth.json"), "{}", r.stderr);
    std::fs::write(&file, "[1]").unwrap();
    let r = import(&env, &src, &["--authfile", file.to_str().unwrap(), "--cert-dir", &certs]);
    assert!(r.code != 0 && r.stderr.contains("not an auth.json file"), "{r:?}");

    let want: Vec<(String, String)> =
        ["authfile", "creds", "creds-over", "default-auth", "noverify", "stdin"].iter().map(|n| (n.to_string(), chain.clone())).collect();
    assert_eq!(names(&env.root), want);
    assert_no_staging(&env);
    env.assert_clean();
}

#[test]
fn unknown_tag_and_unreachable_registry_fail_cleanly() {
    let mut env = Env::new("reg-errors");
    isolate(&mut env, "");
    let img = Images::build(&env);
    let reg = Registry::start(&env, "open", false);
    reg.push(&img.layout(), "base", "t/img:base", false);

    let src = format!("docker://{}/t/img:nope", reg.host());
    let r = import(&env, &src, &["--tls-verify=false"]);
    assert_pull_fails(&env, &r, &src, &["read the manifest", "manifest unknown"]);
    let src = format!("docker://{}/t/none:1", reg.host());
    let r = import(&env, &src, &["--tls-verify=false"]);
    assert_pull_fails(&env, &r, &src, &["read the manifest"]);
    let src = format!("docker://{}/t/img@sha256:{}", reg.host(), "0".repeat(64));
    let r = import(&env, &src, &["--tls-verify=false"]);
    assert_pull_fails(&env, &r, &src, &["manifest unknown"]);

    // TLS asked for (a bare --tls-verify), from a registry without it.
    let src = format!("docker://{}/t/img:base", reg.host());
    let r = import(&env, &src, &["--tls-verify"]);
    assert_pull_fails(&env, &r, &src, &["HTTP response to HTTPS client"]);

    let src = format!("docker://127.0.0.1:{}/t/img:base", free_port());
    let r = import(&env, &src, &["--tls-verify=false"]);
    assert_pull_fails(&env, &r, &src, &["connection refused"]);

    // An image for another machine, asked for by --platform.
    let src = format!("docker://{}/t/img:base", reg.host());
    let r = import(&env, &src, &["--tls-verify=false", "--platform", "linux/s390x"]);
    assert_pull_fails(&env, &r, &src, &[&format!("the image is for linux/{}, not the linux/s390x asked for", host_arch())]);

    // A manifest whose layer is no layer (an artifact): refused before a
    // blob is downloaded.
    let l = img.layout();
    let mut idx: serde_json::Value = serde_json::from_slice(&std::fs::read(l.join("index.json")).unwrap()).unwrap();
    let base = idx["manifests"].as_array().unwrap().iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "base").unwrap().clone();
    let blob = |d: &str| l.join("blobs/sha256").join(&d[7..]);
    let mut m: serde_json::Value = serde_json::from_slice(&std::fs::read(blob(base["digest"].as_str().unwrap())).unwrap()).unwrap();
    m["layers"][1]["mediaType"] = "application/vnd.example.not-a-layer".into();
    let data = m.to_string();
    let d = format!("sha256:{}", common::tree::sha256_hex(data.as_bytes()));
    std::fs::write(blob(&d), &data).unwrap();
    idx["manifests"].as_array_mut().unwrap().push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": d, "size": data.len(),
        "annotations": {"org.opencontainers.image.ref.name": "odd"},
    }));
    std::fs::write(l.join("index.json"), idx.to_string()).unwrap();
    reg.push(&l, "odd", "t/odd:1", false);
    let src = format!("docker://{}/t/odd:1", reg.host());
    let mark = reg.mark();
    let r = import(&env, &src, &["--tls-verify=false"]);
    assert_pull_fails(&env, &r, &src, &["layer 2", "unsupported layer media type \"application/vnd.example.not-a-layer\""]);
    let cfg = m["config"]["digest"].as_str().unwrap().to_string();
    assert_eq!(reg.blob_gets("t/odd", mark), [(cfg, 1)].into_iter().collect(), "only the config was read");

    // After all that, a docker (schema 2) manifest, which skopeo converts
    // to OCI on its way into the layout: the same layers, the same tree.
    need("skopeo");
    sh(
        &format!("skopeo --insecure-policy copy -q --format v2s2 --dest-tls-verify=false oci:L:derived docker://{}/t/v2:1", reg.host()),
        &img.dir,
    );
    let (_, _, chain) = img.docs("derived");
    let src = format!("docker://{}/t/v2:1", reg.host());
    let (id, _) = import_ok(&env, &src, &["--tls-verify=false"]);
    assert_eq!(id, chain);
    mount_and_compare(&env, &format!("{}/t/v2:1", reg.host()), &img.expected("derived"));
    env.assert_clean();
}

#[test]
fn malformed_references_and_misplaced_options_are_refused() {
    let env = Env::new("reg-bad");
    let bad: &[(&str, &str)] = &[
        ("docker://", "no image reference"),
        ("docker:busybox", "a registry image is docker://REF"),
        ("docker://Busybox", "not allowed"),
        ("docker://a:", "is not a tag"),
        ("docker://a:-x", "is not a tag"),
        ("docker://a b", "not allowed"),
        ("docker://a//b", "empty path component"),
        ("docker://a..b", "separator"),
        ("docker://127.0.0.1:0/a", "bad port"),
        ("docker://a@sha256:12", "is not a digest"),
        ("docker://a@md5:00", "is not a digest"),
        ("docker://a\u{7}", "not allowed"),
    ];
    for (src, msg) in bad {
        let r = import(&env, src, &[]);
        r.fails(1, msg);
        assert!(r.stderr.contains(src.trim_end_matches('\u{7}')), "names the source: {}", r.stderr);
    }
    let r = import(&env, &format!("docker://a:1@sha256:{}", "a".repeat(64)), &[]);
    r.fails(1, "a tag and a digest together");
    for p in ["linux", "linux/", "a/b/c/d"] {
        import(&env, "docker://127.0.0.1:9/a", &["--platform", p]).fails(1, "want OS/ARCH[/VARIANT]");
    }
    let r = import(&env, "oci:/nonexistent:t", &["--creds", "a:b", "--platform", "linux/amd64"]);
    r.fails(1, "--creds, --platform: only for a docker:// source");
    import(&env, "oci:/nonexistent:t", &["--tls-verify=false"]).fails(1, "--tls-verify: only for a docker:// source");
    import(&env, "docker://127.0.0.1:9/a", &["--tls-verify=maybe"]).fails(1, "");
    import(&env, "docker://127.0.0.1:9/a", &["--cert-dir", "/nonexistent"]).fails(32, "--cert-dir: /nonexistent");
    import(&env, "docker://127.0.0.1:9/a", &["--creds", ":pw"]).fails(1, "empty user name");
    // --creds USER with nothing on stdin (the harness gives /dev/null).
    import(&env, "docker://127.0.0.1:9/a", &["--creds", "bob"]).fails(1, "no password given");
    assert_eq!(layer_count(&env), 0);
    assert_no_staging(&env);
    env.assert_clean();
}

/// A TCP relay between skopeo and the registry that holds back the rest
/// of one blob's response once `after` bytes of it have gone through, so
/// that the registry can be killed with the blob half-sent.
struct Relay {
    port: u16,
    /// Set once the blob is half-sent.
    half: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Every connection's sockets, to cut them all.
    socks: std::sync::Arc<std::sync::Mutex<Vec<TcpStream>>>,
}

impl Relay {
    fn start(to: u16, blob_path: String, after: u64) -> Relay {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let half = Arc::new(AtomicBool::new(false));
        let socks: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (h, sk) = (half.clone(), socks.clone());
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(c) = c else { return };
                let Ok(up) = TcpStream::connect(("127.0.0.1", to)) else { return };
                sk.lock().unwrap().extend([c.try_clone().unwrap(), up.try_clone().unwrap()]);
                // The request for the blob seen on this connection.
                let asked = Arc::new(AtomicBool::new(false));
                let (mut cr, mut uw, a, want) = (c.try_clone().unwrap(), up.try_clone().unwrap(), asked.clone(), blob_path.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    while let Ok(n) = cr.read(&mut buf) {
                        if n == 0 || uw.write_all(&buf[..n]).is_err() {
                            return;
                        }
                        if String::from_utf8_lossy(&buf[..n]).contains(&want) {
                            a.store(true, Ordering::SeqCst);
                        }
                    }
                });
                let (mut ur, mut cw, h) = (up, c, h.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 16384];
                    let mut sent = 0u64;
                    while let Ok(n) = ur.read(&mut buf) {
                        if n == 0 || cw.write_all(&buf[..n]).is_err() {
                            return;
                        }
                        if asked.load(Ordering::SeqCst) {
                            sent += n as u64;
                            if sent >= after {
                                // Hold the rest: the test kills the registry now.
                                h.store(true, Ordering::SeqCst);
                                return;
                            }
                        }
                    }
                });
            }
        });
        Relay { port, half, socks }
    }

    /// Cut every connection, as the registry's death does.
    fn cut(&self) {
        for s in self.socks.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The registry SIGKILLed while a layer blob is half-sent (through a relay
/// that holds back the rest): the fetch fails, and nothing is left in the
/// store or the staging.
#[test]
fn registry_killed_with_a_blob_half_sent_leaves_nothing() {
    let mut env = Env::new("reg-half");
    isolate(&mut env, "");
    let img = Images::build(&env);
    let mut reg = Registry::start(&env, "open", false);
    reg.push(&img.layout(), "base", "t/img:base", false);
    // The first layer holds the 1 MB of random data.
    let (_, layers, _) = img.docs("base");
    let relay = Relay::start(reg.port, format!("/v2/t/img/blobs/{}", layers[0]), 64 << 10);
    let src = format!("docker://127.0.0.1:{}/t/img:base", relay.port);
    let a = import_args(&env, &src, &["--tls-verify=false"]);
    let mut c = env.command(&a.iter().map(String::as_str).collect::<Vec<_>>());
    c.stdout(Stdio::piped()).stderr(Stdio::piped());
    let k = c.spawn().unwrap();
    let t = Instant::now();
    while !relay.half.load(std::sync::atomic::Ordering::SeqCst) {
        assert!(t.elapsed() < Duration::from_secs(30), "the blob never started");
        std::thread::sleep(Duration::from_millis(5));
    }
    // Half of it went through; skopeo waits for the rest. The registry
    // dies, and its connections with it.
    reg.kill();
    relay.cut();
    let out = k.wait_with_output().unwrap();
    let r = Run { code: out.status.code().unwrap_or(-1), stdout: String::from_utf8_lossy(&out.stdout).into(), stderr: String::from_utf8_lossy(&out.stderr).into() };
    assert_pull_fails(&env, &r, &src, &["fetch the layers", "unexpected EOF"]);
    env.assert_clean();
}

/// The registry SIGSTOPped once the manifest and config are read, skopeo
/// connected to it, then the registry SIGKILLed: the fetch fails, and
/// nothing is left in the store or the staging.
#[test]
fn registry_killed_mid_pull_leaves_nothing() {
    let mut env = Env::new("reg-kill");
    isolate(&mut env, "");
    let img = Images::build(&env);
    let mut reg = Registry::start(&env, "open", false);
    reg.push(&img.layout(), "base", "t/img:base", false);
    let src = format!("docker://{}/t/img:base", reg.host());
    let (k, mut err, seen) = spawn_stopped(&env, &src, &["--tls-verify=false"]);
    // The work layout exists now, with nothing fetched.
    let work: Vec<_> = std::fs::read_dir(env.fallback.join("tmp")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert!(work.iter().any(|n| n.starts_with("import-pull.")), "{work:?}");
    reg.signal(rustix::process::Signal::STOP);
    cont(&k);
    // skopeo's connection is taken by the kernel (the registry is stopped
    // and answers nothing): wait for it to be established.
    let port = format!(":{:04X} ", reg.port);
    let t = Instant::now();
    loop {
        // (Go may dial IPv4 on an AF_INET6 socket: tcp6 lists it then.)
        let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap() + &std::fs::read_to_string("/proc/net/tcp6").unwrap_or_default();
        // Client side: remote port ours, state 01 (ESTABLISHED).
        if tcp.lines().skip(1).any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && format!("{} ", &f[2][f[2].len() - 5..]) == port && f[3] == "01"
        }) {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "skopeo never connected: {tcp}");
        std::thread::sleep(Duration::from_millis(10));
    }
    reg.kill();
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    let mut k = k;
    let st = k.wait().unwrap();
    let r = Run { code: st.code().unwrap_or(-1), stdout: String::new(), stderr: seen + &rest };
    assert_pull_fails(&env, &r, &src, &["fetch the layers", "skopeo"]);
    env.assert_clean();
}

/// SIGINT while skopeo fetches (from a registry that hangs: stopped):
/// skopeo is killed, the work layout removed, exit 8.
#[test]
fn sigint_during_the_fetch_kills_skopeo_and_undoes_everything() {
    let mut env = Env::new("reg-int");
    isolate(&mut env, "");
    let img = Images::build(&env);
    let reg = Registry::start(&env, "open", false);
    reg.push(&img.layout(), "base", "t/img:base", false);
    let src = format!("docker://{}/t/img:base", reg.host());
    let (mut k, _err, _) = spawn_stopped(&env, &src, &["--tls-verify=false"]);
    reg.signal(rustix::process::Signal::STOP);
    cont(&k);
    let sk = descendant_running(k.id(), "skopeo").expect("skopeo runs");
    rustix::process::kill_process(rustix::process::Pid::from_raw(k.id() as i32).unwrap(), rustix::process::Signal::INT).unwrap();
    let st = k.wait().unwrap();
    assert_eq!(st.code(), Some(8), "interrupted");
    // Reaped by sharedloop before it exited: no such process now.
    let stat = std::fs::read_to_string(format!("/proc/{sk}/stat")).unwrap_or_default();
    assert!(!stat.contains("(skopeo)"), "skopeo outlived the import: {stat}");
    reg.signal(rustix::process::Signal::CONT);
    assert_eq!(layer_count(&env), 0);
    assert_no_staging(&env);
    env.assert_clean();
}

/// SIGKILLed mid-pull, the import leaves its work directory (with the
/// --creds auth file, private); the next gc removes it.
#[test]
fn sigkill_leaves_a_private_work_directory_that_gc_removes() {
    use std::os::unix::fs::PermissionsExt;
    let mut env = Env::new("reg-sigkill");
    isolate(&mut env, "");
    let img = Images::build(&env);
    let reg = Registry::start(&env, "open", false);
    reg.push(&img.layout(), "base", "t/img:base", false);
    let src = format!("docker://{}/t/img:base", reg.host());
    let (mut k, _err, _) = spawn_stopped(&env, &src, &["--tls-verify=false", "--creds", "bob:pw"]);
    k.kill().unwrap();
    k.wait().unwrap();
    let tmp = env.fallback.join("tmp");
    let work: Vec<PathBuf> = std::fs::read_dir(&tmp).unwrap().flatten().map(|e| e.path()).filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("import-pull.")).collect();
    assert_eq!(work.len(), 1, "{work:?}");
    assert_eq!(std::fs::metadata(&work[0]).unwrap().permissions().mode() & 0o777, 0o700);
    assert_eq!(std::fs::metadata(work[0].join("auth.json")).unwrap().permissions().mode() & 0o777, 0o600);
    env.sl(&["gc"]).ok();
    assert_no_staging(&env);
    env.assert_clean();
}

/// The tag is moved to another image between the inspection and the copy:
/// the pull still gets the image it inspected, whole.
#[test]
fn a_tag_moved_mid_pull_cannot_mix_images() {
    let mut env = Env::new("reg-move");
    isolate(&mut env, "");
    let img = Images::build(&env);
    let reg = Registry::start(&env, "open", false);
    reg.push(&img.layout(), "base", "t/img:moving", false);
    let (_, _, base_chain) = img.docs("base");
    let src = format!("docker://{}/t/img:moving", reg.host());
    let (mut k, mut err, seen) = spawn_stopped(&env, &src, &["--tls-verify=false", "--name", "moved"]);
    reg.push(&img.layout(), "derived", "t/img:moving", false);
    cont(&k);
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    let mut out = String::new();
    k.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(k.wait().unwrap().success(), "{seen}{rest}");
    assert_eq!(out.trim(), base_chain, "the image inspected, not the one the tag points to now");
    assert_eq!(layer_count(&env), 2);
    mount_and_compare(&env, "moved", &img.expected("base"));
    env.assert_clean();
}

/// A multi-platform index: this machine's image by default, another by
/// --platform, and a clear error for a platform it lacks.
#[test]
fn platform_picks_from_an_index() {
    let mut env = Env::new("reg-platform");
    isolate(&mut env, "");
    let img = Images::build(&env);
    let reg = Registry::start(&env, "open", false);
    let other = if host_arch() == "arm64" { "amd64" } else { "arm64" };
    // `derived` relabelled for the other architecture (its config changes,
    // its layers stay), and an index of both.
    sh(&format!("umoci config --image L:derived --architecture {other} --tag other >/dev/null"), &img.dir);
    let l = img.layout();
    let idx: serde_json::Value = serde_json::from_slice(&std::fs::read(l.join("index.json")).unwrap()).unwrap();
    let desc = |tag: &str| idx["manifests"].as_array().unwrap().iter().find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag).unwrap().clone();
    let entry = |tag: &str, arch: &str, variant: Option<&str>| {
        let mut d = desc(tag);
        d.as_object_mut().unwrap().remove("annotations");
        d["platform"] = serde_json::json!({"os": "linux", "architecture": arch});
        if let Some(v) = variant {
            d["platform"]["variant"] = v.into();
        }
        d
    };
    let index = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [entry("other", other, Some("v8")), entry("base", host_arch(), None)],
    })
    .to_string();
    let hexd = common::tree::sha256_hex(index.as_bytes());
    std::fs::write(l.join("blobs/sha256").join(&hexd), &index).unwrap();
    let mut top = idx.clone();
    top["manifests"].as_array_mut().unwrap().push(serde_json::json!({
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "digest": format!("sha256:{hexd}"),
        "size": index.len(),
        "annotations": {"org.opencontainers.image.ref.name": "multi"},
    }));
    std::fs::write(l.join("index.json"), top.to_string()).unwrap();
    reg.push(&l, "multi", "t/multi:1", true);
    let (_, _, base_chain) = img.docs("base");
    let (_, _, der_chain) = img.docs("derived");

    let src = format!("docker://{}/t/multi:1", reg.host());
    let (id, _) = import_ok(&env, &src, &["--tls-verify=false"]);
    assert_eq!(id, base_chain, "this machine's image");
    let (id, _) = import_ok(&env, &src, &["--tls-verify=false", "--platform", &format!("linux/{other}/v8"), "--name", "other"]);
    assert_eq!(id, der_chain, "the other platform's (same layers as derived)");
    mount_and_compare(&env, "other", &img.expected("derived"));
    let r = import(&env, &src, &["--tls-verify=false", "--platform", "linux/s390x"]);
    assert_eq!(r.code, 32, "{r:?}");
    assert!(r.stderr.contains("no image for linux/s390x") && r.stderr.contains(&format!("linux/{other}/v8")), "{}", r.stderr);

    // A single image for the other machine: taken with a warning when no
    // --platform was given.
    reg.push(&l, "other", "t/single:1", false);
    let src = format!("docker://{}/t/single:1", reg.host());
    let (id, err) = import_ok(&env, &src, &["--tls-verify=false"]);
    assert_eq!(id, der_chain);
    assert!(err.contains(&format!("warning: {src} is an image for linux/{other}, this machine is linux/{}", host_arch())), "{err}");
    assert_no_staging(&env);
    env.assert_clean();
}

/// registries.conf (skopeo's) is honoured: a reference to a registry that
/// is down is served by its mirror.
#[test]
fn mirrors_from_registries_conf() {
    let mut env = Env::new("reg-mirror");
    let img = Images::build(&env);
    let reg = Registry::start(&env, "mirror", false);
    reg.push(&img.layout(), "base", "t/img:base", false);
    let dead = free_port();
    isolate(
        &mut env,
        &format!(
            "[[registry]]\nprefix = \"127.0.0.1:{dead}/up\"\nlocation = \"127.0.0.1:{dead}/up\"\n\n[[registry.mirror]]\nlocation = \"{}/t\"\ninsecure = true\n",
            reg.host()
        ),
    );
    let (_, _, chain) = img.docs("base");
    let src = format!("docker://127.0.0.1:{dead}/up/img:base");
    let mark = reg.mark();
    let (id, _) = import_ok(&env, &src, &[]);
    assert_eq!(id, chain);
    assert_eq!(names(&env.root), vec![(format!("127.0.0.1:{dead}/up/img:base"), chain.clone())]);
    let gets = reg.blob_gets("t/img", mark);
    assert!(!gets.is_empty(), "the mirror served the pull");

    // The same file by --registries-conf (over the environment's, empty).
    let conf = env.dir.join("registries.conf");
    let mirrored = std::fs::read_to_string(&conf).unwrap();
    let given = env.dir.join("given.conf");
    std::fs::write(&given, mirrored).unwrap();
    std::fs::write(&conf, "").unwrap();
    let r = import(&env, &src, &[]);
    assert_pull_fails_keeping(&r, &src, &["connection refused"]);
    let (id, _) = import_ok(&env, &src, &["--registries-conf", given.to_str().unwrap(), "--name", "given"]);
    assert_eq!(id, chain);
    let r = import(&env, &src, &["--registries-conf", "/nonexistent.conf"]);
    assert_pull_fails_keeping(&r, &src, &["registries.conf: open: /nonexistent.conf"]);
    env.assert_clean();
}
