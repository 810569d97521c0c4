//! Debian's reference registry (`docker-registry`) on 127.0.0.1 for the
//! tests that pull `docker://` (tests/registry.rs, tests/producers.rs).

use super::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port nothing listens on right now (the kernel's pick for port 0).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}


pub const USER: &str = "alice";
pub const PASS: &str = "s3cret-pw";

/// A docker-registry process of this test; killed and reaped on drop.
pub struct Registry {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub tls: bool,
    /// Sentinel requests sent so far (see `blob_gets`).
    pub seq: std::cell::Cell<u32>,
}

impl Registry {
    /// `auth`: htpasswd users and TLS (a self-signed certificate for
    /// 127.0.0.1, its CA directory at `certs()`).
    pub fn start(env: &Env, name: &str, auth: bool) -> Registry {
        need("docker-registry");
        let dir = env.dir.join(format!("registry-{name}"));
        std::fs::create_dir_all(dir.join("data")).unwrap();
        let mut extra = String::new();
        if auth {
            need("htpasswd");
            need("openssl");
            sh(&format!("htpasswd -Bbn {USER} {PASS} > htpasswd"), &dir);
            sh(
                "openssl req -x509 -newkey rsa:2048 -nodes -keyout key.pem -out cert.pem -days 2 \
                 -subj /CN=127.0.0.1 -addext subjectAltName=IP:127.0.0.1 2>/dev/null && mkdir certs && cp cert.pem certs/ca.crt",
                &dir,
            );
            extra = format!(
                "  tls:\n    certificate: {d}/cert.pem\n    key: {d}/key.pem\nauth:\n  htpasswd:\n    realm: sharedloop-test\n    path: {d}/htpasswd\n",
                d = dir.display()
            );
        }
        let log = dir.join("registry.log");
        // The kernel's free port can be taken by someone else before the
        // registry binds it: then try another.
        for _ in 0..5 {
            let port = free_port();
            let cfg = format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  secret: sharedloop-test\n{extra}",
                dir.join("data").display()
            );
            std::fs::write(dir.join("config.yml"), cfg).unwrap();
            let out = std::fs::File::create(&log).unwrap();
            let child = Command::new("docker-registry")
                .arg("serve")
                .arg(dir.join("config.yml"))
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .expect("start docker-registry");
            let mut r = Registry { child: Some(child), port, dir: dir.clone(), log: log.clone(), tls: auth, seq: Default::default() };
            let t = Instant::now();
            loop {
                if let Some(st) = r.child.as_mut().unwrap().try_wait().unwrap() {
                    r.child = None;
                    let text = std::fs::read_to_string(&log).unwrap_or_default();
                    assert!(text.contains("address already in use"), "docker-registry ended ({st}): {text}");
                    break;
                }
                if TcpStream::connect(("127.0.0.1", port)).is_ok() && std::fs::read_to_string(&log).unwrap_or_default().contains("listening on") {
                    return r;
                }
                assert!(t.elapsed() < Duration::from_secs(30), "docker-registry did not start: {}", std::fs::read_to_string(&log).unwrap_or_default());
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("no free port for docker-registry");
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn certs(&self) -> PathBuf {
        self.dir.join("certs")
    }

    /// skopeo's options to reach it (pushing).
    pub fn dest_opts(&self) -> String {
        if self.tls {
            format!("--dest-cert-dir {} --dest-creds {USER}:{PASS}", self.certs().display())
        } else {
            "--dest-tls-verify=false".into()
        }
    }

    pub fn push(&self, layout: &Path, tag: &str, to: &str, all: bool) {
        need("skopeo");
        let dir = layout.parent().unwrap();
        let name = layout.file_name().unwrap().to_str().unwrap();
        sh(
            &format!(
                "skopeo --insecure-policy copy -q {} {} oci:{name}:{tag} docker://{}/{to}",
                if all { "--all" } else { "" },
                self.dest_opts(),
                self.host()
            ),
            dir,
        );
    }

    /// How often each blob of repository `repo` was downloaded (GET, 200)
    /// since the log was `mark`ed at `from`. The registry writes a request's
    /// line after answering it, so first a request of our own is sent and
    /// its line waited for: the lines of the pull before it are then there.
    pub fn blob_gets(&self, repo: &str, from: usize) -> std::collections::BTreeMap<String, usize> {
        assert!(!self.tls, "blob_gets probes over plain HTTP");
        self.seq.set(self.seq.get() + 1);
        let want = format!("/v2/?sentinel={}", self.seq.get());
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(s, "GET {want} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", self.host()).unwrap();
        let mut sink = vec![];
        let _ = s.read_to_end(&mut sink);
        let t = Instant::now();
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap();
            if text.lines().skip(from).any(|l| l.contains(&want)) {
                let mut m = std::collections::BTreeMap::new();
                let pat = format!("\"GET /v2/{repo}/blobs/sha256:");
                for l in text.lines().skip(from) {
                    if let Some(i) = l.find(&pat) {
                        let rest = &l[i + pat.len()..];
                        let hex = &rest[..64];
                        if rest[64..].starts_with(" HTTP/1.1\" 200 ") {
                            *m.entry(format!("sha256:{hex}")).or_insert(0) += 1;
                        }
                    }
                }
                return m;
            }
            assert!(t.elapsed() < Duration::from_secs(20), "the registry never logged {want}");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The log's length in lines, for `blob_gets`.
    pub fn mark(&self) -> usize {
        std::fs::read_to_string(&self.log).unwrap().lines().count()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn signal(&self, sig: rustix::process::Signal) {
        rustix::process::kill_process(rustix::process::Pid::from_raw(self.pid() as i32).unwrap(), sig).unwrap();
    }

    /// Kill it now and reap it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The environment of every pull: this test's registries.conf (none of
/// the machine's mirrors), auth file location and HOME.
pub fn isolate(env: &mut Env, conf: &str) {
    let home = env.dir.join("home");
    std::fs::create_dir_all(home.join("run")).unwrap();
    std::fs::write(env.dir.join("registries.conf"), conf).unwrap();
    env.envs.retain(|(k, _)| !["CONTAINERS_REGISTRIES_CONF", "REGISTRY_AUTH_FILE", "HOME", "XDG_RUNTIME_DIR"].contains(&k.as_str()));
    env.envs.push(("CONTAINERS_REGISTRIES_CONF".into(), env.dir.join("registries.conf").display().to_string()));
    env.envs.push(("REGISTRY_AUTH_FILE".into(), home.join("auth.json").display().to_string()));
    env.envs.push(("HOME".into(), home.display().to_string()));
    env.envs.push(("XDG_RUNTIME_DIR".into(), home.join("run").display().to_string()));
}
