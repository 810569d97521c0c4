//! Test harness: every test gets its own private mount namespace, store,
//! state directory and utab, and checks at its end that nothing of its own
//! is still attached or mounted.
//!
//! The namespace is held by a child `sleep` started under `unshare -m
//! --propagation private`; commands run in it through `nsenter`. In it, a
//! read-only overlay over /usr/sbin adds mount.sharedloop and
//! umount.sharedloop (links to the binary under test) where mount(8) looks,
//! and a tmpfs over /run/mount gives a private utab. Dropping the `Env`
//! kills the holder, so a panicking test cannot leave mounts on the host;
//! its loop devices then go by autoclear.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub mod cluster;
pub mod registry;
pub mod tree;

pub const BIN: &str = env!("CARGO_BIN_EXE_sharedloop");

static SEQ: AtomicU32 = AtomicU32::new(0);

pub struct Env {
    pub dir: PathBuf,
    pub root: PathBuf,
    pub fallback: PathBuf,
    pub state: PathBuf,
    holder: Child,
    /// The process that holds the test's namespaces (for a node of a
    /// cluster, a grandchild of `holder`).
    pub pid: u32,
    /// Extra environment for every command (SHAREDLOOP_CONFIG, ...).
    pub envs: Vec<(String, String)>,
    /// The namespaces commands enter (nsenter flags): the mount namespace,
    /// and for a cluster node its UTS, network and PID namespaces too.
    ns_flags: Vec<&'static str>,
}

#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from(o: Output) -> Run {
        Run {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn ok(&self) -> &Run {
        assert_eq!(self.code, 0, "command failed: stdout={} stderr={}", self.stdout, self.stderr);
        self
    }

    #[track_caller]
    pub fn fails(&self, code: i32, msg: &str) -> &Run {
        assert_eq!(self.code, code, "want exit {code}: stdout={} stderr={}", self.stdout, self.stderr);
        assert!(self.stderr.contains(msg), "stderr lacks {msg:?}: {}", self.stderr);
        self
    }
}

/// What to put in a layer directory.
pub enum E<'a> {
    File(&'a str),
    Dir,
    /// overlay whiteout: char device 0/0
    Whiteout,
    /// directory with trusted.overlay.opaque=y
    Opaque,
    Symlink(&'a str),
}

fn sbin() -> PathBuf {
    std::fs::canonicalize("/sbin").unwrap_or_else(|_| PathBuf::from("/usr/sbin"))
}

impl Env {
    pub fn new(name: &str) -> Env {
        let dir = std::env::temp_dir().join(format!(
            "sl-test-{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let root = dir.join("root");
        let fallback = dir.join("fallback");
        let state = dir.join("state");
        let mut c = Command::new("unshare");
        c.args(["-m", "--propagation", "private", "--", "sh", "-c", &holder_script(&dir, "")]);
        let holder = spawn_holder(c, "namespace holder");
        let pid = holder.id();
        Env { dir, root, fallback, state, holder, pid, envs: vec![], ns_flags: vec!["-m"] }
    }

    /// An Env whose namespace holder is started by `cmd` (which must run
    /// `holder_script`) as a grandchild: `holder` is the direct child and
    /// `pid` the process found below it. Commands enter `ns_flags`.
    pub fn with_holder(dir: PathBuf, root: PathBuf, cmd: Command, ns_flags: Vec<&'static str>) -> Env {
        let fallback = dir.join("fallback");
        let state = dir.join("state");
        let mut holder = spawn_holder(cmd, "node holder");
        let Some(pid) = descendant_running(holder.id(), "sleep") else {
            let _ = holder.kill();
            let _ = holder.wait();
            panic!("node holder did not start");
        };
        Env { dir, root, fallback, state, holder, pid, envs: vec![], ns_flags }
    }

    pub fn store_opts(&self) -> String {
        format!("loopback_root={},loopback_fallback={}", self.root.display(), self.fallback.display())
    }

    /// Run a command inside the test's namespace.
    pub fn run(&self, args: &[&str]) -> Run {
        self.run_env(args, &[])
    }

    pub fn run_env(&self, args: &[&str], extra: &[(&str, &str)]) -> Run {
        let mut c = self.command(args);
        for (k, v) in extra {
            c.env(k, v);
        }
        Run::from(c.output().expect("run command"))
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid.to_string()]).args(&self.ns_flags).arg("--").args(args);
        c.env("SHAREDLOOP_STATE_DIR", &self.state);
        // Tests make many uppers of the default 10 GiB at once on the
        // build machine's disk: sparse here, as the harness's only default.
        // Tests of upper_alloc=full ask for it.
        let conf = self.dir.join("harness.conf");
        if !conf.exists() {
            std::fs::write(&conf, "upper_alloc=sparse\n").unwrap();
        }
        c.env("SHAREDLOOP_CONFIG", conf);
        c.env_remove("SHAREDLOOP_FAILPOINT");
        for (k, v) in &self.envs {
            c.env(k, v);
        }
        c.stdin(Stdio::null());
        c
    }

    pub fn sh(&self, script: &str) -> Run {
        self.run(&["sh", "-c", script])
    }

    /// `sharedloop ARGS` on this test's store.
    pub fn sl(&self, args: &[&str]) -> Run {
        let (root, fb) = (self.root.to_str().unwrap().to_string(), self.fallback.to_str().unwrap().to_string());
        let mut v: Vec<&str> = vec![BIN];
        v.extend_from_slice(args);
        v.extend_from_slice(&["--loopback-root", &root, "--loopback-fallback", &fb]);
        self.run(&v)
    }

    /// `sharedloop add` with this test's store; returns the chain ID.
    pub fn add(&self, parent: Option<&str>, name: Option<&str>, entries: &[(&str, E)]) -> String {
        self.add_with(parent, name, entries, &[])
    }

    pub fn add_with(&self, parent: Option<&str>, name: Option<&str>, entries: &[(&str, E)], extra: &[&str]) -> String {
        let src = self.dir.join(format!("src-{}", SEQ.fetch_add(1, Ordering::SeqCst)));
        make_tree(&src, entries);
        let mut args: Vec<String> = vec![
            BIN.into(),
            "add".into(),
            src.to_string_lossy().into(),
            "--loopback-root".into(),
            self.root.to_string_lossy().into(),
            "--loopback-fallback".into(),
            self.fallback.to_string_lossy().into(),
        ];
        if let Some(p) = parent {
            args.extend(["--parent".into(), p.into()]);
        }
        if let Some(n) = name {
            args.extend(["--name".into(), n.into()]);
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let r = self.run(&argv);
        r.ok();
        let _ = std::fs::remove_dir_all(&src);
        let id = r.stdout.trim().to_string();
        assert!(id.starts_with("sha256:") && id.len() == 71, "add printed {id:?}");
        id
    }

    /// A directory to mount on.
    pub fn mnt(&self, name: &str) -> PathBuf {
        let p = self.dir.join("mnt").join(name);
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn mountinfo(&self) -> Vec<String> {
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid))
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    /// mountinfo lines of mounts this test made (not the harness's own).
    pub fn my_mounts(&self) -> Vec<String> {
        let d = self.dir.to_string_lossy().to_string();
        self.mountinfo()
            .into_iter()
            .filter(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let (mp, rest) = (f[4], l.split(" - ").nth(1).unwrap_or(""));
                // A cluster node's store (a FUSE mount) is the harness's.
                (mp.starts_with(&d) && !rest.starts_with("fuse.glusterfs "))
                    || (rest.starts_with("overlay ") && !rest.starts_with("overlay sl-test-sbin"))
            })
            .collect()
    }

    /// The overlay mount at `target`: (source, super options).
    pub fn overlay_at(&self, target: &Path) -> Option<(String, String)> {
        let t = target.to_string_lossy();
        self.mountinfo().into_iter().rev().find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            let right: Vec<&str> = l.split(" - ").nth(1)?.splitn(3, ' ').collect();
            (f[4] == t && right[0] == "overlay").then(|| (right[1].to_string(), right.get(2).unwrap_or(&"").to_string()))
        })
    }

    /// Loop devices whose backing file is under this test's directory.
    pub fn my_loops(&self) -> Vec<(u32, String)> {
        loops_under(&self.dir)
    }

    pub fn utab(&self) -> String {
        self.sh("cat /run/mount/utab 2>/dev/null").stdout
    }

    /// Nothing of this test is mounted or attached, no scratch directory or
    /// temporary file is left. Waits for autoclear (asynchronous).
    #[track_caller]
    pub fn assert_clean(&self) {
        let m = self.my_mounts();
        assert!(m.is_empty(), "mounts left: {m:#?}");
        assert!(wait_no_loops(&self.dir, Duration::from_secs(10)), "loop devices left: {:?}", self.my_loops());
        let scratch = self.state.join("scratch");
        let left: Vec<_> = std::fs::read_dir(&scratch).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
        assert!(left.is_empty(), "scratch left: {left:?}");
        let tmp = self.leftovers();
        assert!(tmp.is_empty(), "temporary files left: {tmp:?}");
    }

    /// `leftovers` as this test's namespace sees its directory (a cluster
    /// node's store is a FUSE mount only its namespace has).
    pub fn leftovers(&self) -> Vec<PathBuf> {
        let view = PathBuf::from(format!("/proc/{}/root{}", self.pid, self.dir.display()));
        leftovers(&view).into_iter().map(|p| self.dir.join(p.strip_prefix(&view).unwrap())).collect()
    }

    /// A path of this test's namespace, readable from the host.
    pub fn view(&self, p: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{}", self.pid, p.display()))
    }
}

/// The shell script a namespace holder runs after `pre` (extra set-up):
/// a private utab, mount.sharedloop/umount.sharedloop where mount(8)
/// looks, then "ready" and sleep until killed.
pub fn holder_script(dir: &Path, pre: &str) -> String {
    let helpers = dir.join("helpers");
    std::fs::create_dir_all(&helpers).unwrap();
    for n in ["mount.sharedloop", "umount.sharedloop", "sharedloop"] {
        let l = helpers.join(n);
        if std::fs::symlink_metadata(&l).is_err() {
            std::os::unix::fs::symlink(BIN, l).unwrap();
        }
    }
    format!(
        "set -e; {pre} mount -t tmpfs tmpfs /run/mount 2>/dev/null || {{ mkdir -p /run/mount; mount -t tmpfs tmpfs /run/mount; }}; \
         mount -t overlay sl-test-sbin -o lowerdir={}:{} {}; echo ready; exec sleep 100000",
        helpers.display(),
        sbin().display(),
        sbin().display()
    )
}

/// Start a holder and wait for its "ready" line.
pub fn spawn_holder(mut c: Command, what: &str) -> Child {
    // If the test process dies without unwinding, the holder goes too
    // (and with it every namespace and process below it).
    sharedloop::kernel::sys::die_with_parent(&mut c);
    let mut holder = c.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn holder");
    let mut line = String::new();
    BufReader::new(holder.stdout.take().unwrap()).read_line(&mut line).unwrap();
    if line.trim() != "ready" {
        let _ = holder.kill();
        let _ = holder.wait();
        panic!("{what} did not start (said {line:?})");
    }
    holder
}

/// Child processes of `pid` (all threads).
pub fn children_of(pid: u32) -> Vec<u32> {
    let mut out = vec![];
    if let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in rd.flatten() {
            if let Ok(s) = std::fs::read_to_string(t.path().join("children")) {
                out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
        }
    }
    out
}

/// The first descendant of `pid` (itself included) whose comm is `comm`,
/// waiting up to 10 s for it (a holder says "ready" just before its exec).
pub fn descendant_running(pid: u32, comm: &str) -> Option<u32> {
    let t = Instant::now();
    loop {
        let mut stack = vec![pid];
        while let Some(p) = stack.pop() {
            if std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm) {
                return Some(p);
            }
            stack.extend(children_of(p));
        }
        if t.elapsed() > Duration::from_secs(10) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Processes in the mount namespace of `pid` (itself included): every
/// command a test ran through `nsenter` into its private namespace, which
/// are not children of the holder and outlive it.
fn processes_in_mnt_ns_of(pid: u32) -> Vec<u32> {
    use std::os::unix::fs::MetadataExt;
    let Ok(ns) = std::fs::metadata(format!("/proc/{pid}/ns/mnt")).map(|m| m.ino()) else { return vec![] };
    // Never the namespace this test binary is in (the host's, or the
    // kernel-surface wrapper's): only a private one is the test's own.
    if std::fs::metadata("/proc/self/ns/mnt").is_ok_and(|m| m.ino() == ns) {
        return vec![];
    }
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else { continue };
        if std::fs::metadata(format!("/proc/{p}/ns/mnt")).is_ok_and(|m| m.ino() == ns) {
            out.push(p);
        }
    }
    out
}

impl Drop for Env {
    fn drop(&mut self) {
        // A test that panics while a command of its own is still running
        // (an import paused at a failpoint, holding its view of the lower
        // layers and so a loop device) must not leave it behind: such a
        // command is in the test's private mount namespace and nothing
        // else is, so everything there goes.
        let ns_pid = self.pid;
        for _ in 0..50 {
            let left: Vec<u32> = processes_in_mnt_ns_of(ns_pid).into_iter().filter(|&p| p != ns_pid && p != self.holder.id()).collect();
            if left.is_empty() {
                break;
            }
            for p in left {
                let _ = Command::new("kill").args(["-KILL", &p.to_string()]).status();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        if self.pid != self.holder.id() {
            let _ = Command::new("kill").args(["-KILL", &self.pid.to_string()]).status();
        }
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        wait_no_loops(&self.dir, Duration::from_secs(10));
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Staging directories, half-made uppers, name and image config records.
pub fn leftovers(dir: &Path) -> Vec<PathBuf> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else { continue };
        for e in rd.flatten() {
            let p = e.path();
            let name = e.file_name().to_string_lossy().into_owned();
            let parent = d.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            let grandparent = d.parent().and_then(|g| g.file_name()).map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
            if (parent == "tmp" && (grandparent == "root" || grandparent == "fallback"))
                || name.contains(".tmp.")
                || ((parent == "names" || parent == "configs" || parent == "confignames") && name.starts_with('.'))
            {
                out.push(p.clone());
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) && !p.starts_with(dir.join("mnt")) {
                stack.push(p);
            }
        }
    }
    out
}

pub fn loops_under(dir: &Path) -> Vec<(u32, String)> {
    let d = dir.to_string_lossy().to_string();
    let mut out = vec![];
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name.strip_prefix("loop").and_then(|s| s.parse::<u32>().ok()) else { continue };
        if let Ok(b) = std::fs::read_to_string(format!("/sys/block/loop{n}/loop/backing_file")) {
            if b.starts_with(&d) {
                out.push((n, b.trim().to_string()));
            }
        }
    }
    out.sort();
    out
}

pub fn wait_no_loops(dir: &Path, t: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < t {
        if loops_under(dir).is_empty() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    loops_under(dir).is_empty()
}

pub fn make_tree(root: &Path, entries: &[(&str, E)]) {
    std::fs::create_dir_all(root).unwrap();
    for (path, e) in entries {
        let p = root.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        match e {
            E::File(c) => std::fs::write(&p, c).unwrap(),
            E::Dir => std::fs::create_dir_all(&p).unwrap(),
            E::Whiteout => {
                let st = Command::new("mknod").arg(&p).args(["c", "0", "0"]).status().unwrap();
                assert!(st.success());
            }
            E::Opaque => {
                std::fs::create_dir_all(&p).unwrap();
                let st = Command::new("setfattr").args(["-n", "trusted.overlay.opaque", "-v", "y"]).arg(&p).status().unwrap();
                assert!(st.success());
            }
            E::Symlink(t) => std::os::unix::fs::symlink(t, &p).unwrap(),
        }
        let _ = std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755));
    }
}

/// Read a file of a mounted tree (mounts live in the namespace: read via
/// /proc/PID/root so the host view is not needed).
pub fn read_in(env: &Env, path: &Path) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{}/root{}", env.pid, path.display())).ok()
}

pub fn list_in(env: &Env, path: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(format!("/proc/{}/root{}", env.pid, path.display()))
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

// ------------------------------------------------- store and helper checks

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

pub fn hex(id: &str) -> &str {
    id.strip_prefix("sha256:").unwrap()
}

pub fn layer_dir(store: &Path, id: &str) -> PathBuf {
    store.join("layers").join(hex(id))
}

/// The helper itself, in the namespace, with the test's store first in -o.
pub fn helper(env: &Env, src: &str, target: &Path, extra: &str) -> Run {
    let o = if extra.is_empty() { env.store_opts() } else { format!("{},{extra}", env.store_opts()) };
    env.run(&["mount.sharedloop", src, s(target), "-o", &o])
}

/// The node's mount records (not temporary ones).
pub fn records(env: &Env) -> Vec<PathBuf> {
    std::fs::read_dir(env.state.join("mounts"))
        .map(|r| r.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect())
        .unwrap_or_default()
}

/// Failed as wanted, with the helper's own prefix, and nothing left.
#[track_caller]
pub fn check_failed(env: &Env, r: &Run, code: i32, frags: &[&str], target: &Path, ctx: &str) {
    assert_eq!(r.code, code, "{ctx}: want exit {code}: {r:?}");
    assert!(r.stderr.starts_with("mount.sharedloop: "), "{ctx}: message should come from the helper: {}", r.stderr);
    for f in frags {
        assert!(r.stderr.contains(f), "{ctx}: stderr lacks {f:?}: {}", r.stderr);
    }
    assert_eq!(r.stderr.trim_end().lines().count(), 1, "{ctx}: one clear line: {}", r.stderr);
    assert!(env.overlay_at(target).is_none(), "{ctx}: mounted anyway");
    assert_eq!(records(env).len(), 0, "{ctx}: state record left");
    assert_eq!(env.utab(), "", "{ctx}: utab entry left");
    env.assert_clean();
}

// ------------------------------------------------- kernel surfaces (issue 9)

/// The kernel the suite is run against, from SHAREDLOOP_TEST_KERNEL: None
/// on the native kernel (the development machines' 6.18), "4.18" or "5.14"
/// under `scripts/kernel-surface` (make check-kernels: seccomp and a fake
/// osrelease), "6.1" in the qemu run of Debian 12's real kernel.
pub fn kernel_surface() -> Option<&'static str> {
    let v = std::env::var("SHAREDLOOP_TEST_KERNEL").ok()?;
    match v.as_str() {
        "" => None,
        "4.18" => Some("4.18"),
        "5.14" => Some("5.14"),
        "6.1" => Some("6.1"),
        other => panic!("SHAREDLOOP_TEST_KERNEL={other}: want 4.18, 5.14 or 6.1 (or unset for the native kernel)"),
    }
}

/// What sharedloop must find the kernel can do (status' `kernel` object).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    pub openat2: bool,
    pub new_mount_api: bool,
    pub loop_configure: bool,
    pub lowerdir_add: bool,
    pub layers_as_fds: bool,
    pub erofs_from_file: bool,
    /// The way mount_api=auto takes: "fd", "path" or "legacy".
    pub mount_api: &'static str,
}

impl Features {
    /// For a value of `kernel_surface()`. The emulated 5.14 cannot hide
    /// what lives behind calls that existed (overlayfs' lowerdir+, erofs
    /// on a file): those are this machine's.
    pub fn of(surface: Option<&str>) -> Features {
        let all = Features {
            openat2: true,
            new_mount_api: true,
            loop_configure: true,
            lowerdir_add: true,
            layers_as_fds: true,
            erofs_from_file: true,
            mount_api: "fd",
        };
        match surface {
            None => all,
            Some("5.14") => Features { layers_as_fds: false, mount_api: "path", ..all },
            Some("6.1") => Features { lowerdir_add: false, layers_as_fds: false, erofs_from_file: false, mount_api: "legacy", ..all },
            Some("4.18") => Features {
                openat2: false,
                new_mount_api: false,
                loop_configure: false,
                lowerdir_add: false,
                layers_as_fds: false,
                erofs_from_file: false,
                mount_api: "legacy",
            },
            Some(other) => panic!("no expected features for kernel {other}"),
        }
    }

    /// status' `kernel` object, as JSON.
    pub fn assert_json(&self, k: &serde_json::Value) {
        let ctx = format!("kernel {} ({:?}): {k}", kernel_surface().unwrap_or("native"), k["release"]);
        for (key, want) in [
            ("openat2", self.openat2),
            ("new_mount_api", self.new_mount_api),
            ("loop_configure", self.loop_configure),
            ("lowerdir_add", self.lowerdir_add),
            ("layers_as_fds", self.layers_as_fds),
            ("erofs_from_file", self.erofs_from_file),
        ] {
            assert_eq!(k[key], want, "{key}: {ctx}");
        }
        assert_eq!(k["mount_api"], self.mount_api, "mount_api: {ctx}");
    }

    /// status' text line of features.
    pub fn line(&self) -> String {
        let y = |b: bool| if b { "yes" } else { "no" };
        format!(
            "  openat2: {}, New Mount API: {}, LOOP_CONFIGURE: {}, lowerdir+: {}, Layers As Fds: {}, erofs From File: {}\n",
            y(self.openat2),
            y(self.new_mount_api),
            y(self.loop_configure),
            y(self.lowerdir_add),
            y(self.layers_as_fds),
            y(self.erofs_from_file)
        )
    }
}

/// What sharedloop must detect on the kernel the tests run on.
pub fn expected_features() -> Features {
    Features::of(kernel_surface())
}

/// Every way of mounting, newest first.
pub const ALL_MOUNT_APIS: [&str; 3] = ["fd", "path", "legacy"];

/// The ways (mount_api=...) this kernel can take, newest first: fd needs
/// layers as fds, path lowerdir+; legacy (mount(2)) is always there.
pub fn mount_apis() -> Vec<&'static str> {
    ALL_MOUNT_APIS.into_iter().filter(|a| mount_api_supported(a)).collect()
}

/// The newest way this kernel has (what mount_api=auto takes).
pub fn best_mount_api() -> &'static str {
    mount_apis()[0]
}

pub fn mount_api_supported(api: &str) -> bool {
    let f = expected_features();
    match api {
        "fd" => f.layers_as_fds,
        "path" => f.lowerdir_add,
        "legacy" | "auto" => true,
        other => panic!("no mount_api {other}"),
    }
}

/// A mount asked for `mount_api=API` on a kernel without that way: exit
/// 32, naming the option and what is missing, nothing at the target (the
/// caller checks the rest is as before).
#[track_caller]
pub fn assert_api_refused(env: &Env, r: &Run, api: &str, target: &Path, ctx: &str) {
    assert!(!mount_api_supported(api), "{ctx}: mount_api={api} is there on this kernel");
    assert_eq!(r.code, 32, "{ctx}: mount_api={api} on a kernel without it: want exit 32: {r:?}");
    let want = format!("mount_api={api} needs");
    assert!(r.stderr.contains(&want), "{ctx}: stderr lacks {want:?}: {}", r.stderr);
    assert!(env.overlay_at(target).is_none(), "{ctx}: mounted anyway");
}

/// What stat(2) says `path` occupies, the test's own count, independent
/// of the code's: (allocated bytes = st_blocks*512 of it and everything
/// below, apparent bytes = st_size of the regular files). Symlinks are not
/// followed.
#[allow(dead_code)]
pub fn stat_usage(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::symlink_metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    let mut u = (md.blocks() * 512, if md.is_file() { md.size() } else { 0 });
    if md.is_dir() {
        for e in std::fs::read_dir(path).unwrap() {
            let (a, b) = stat_usage(&e.unwrap().path());
            u.0 += a;
            u.1 += b;
        }
    }
    u
}

/// Import, expect success, return the printed chain ID.
#[track_caller]
pub fn import_ok(env: &Env, source: &str, extra: &[&str]) -> String {
    let r = env.run(&import_args(env, source, extra).iter().map(String::as_str).collect::<Vec<_>>());
    r.ok();
    let id = r.stdout.trim().to_string();
    assert!(id.starts_with("sha256:") && id.len() == 71, "import printed {id:?}");
    id
}

/// Mount image `source` at the new mount point `name` with the store's
/// options (mount(8), default upper).
pub fn mount_image(env: &Env, source: &str, name: &str) -> PathBuf {
    let m = env.mnt(name);
    env.run(&["mount", "-t", "sharedloop", source, m.to_str().unwrap(), "-o", &env.store_opts()]).ok();
    m
}

/// umount(8) of `m`, expecting success.
pub fn umount_image(env: &Env, m: &Path) {
    env.run(&["umount", m.to_str().unwrap()]).ok();
}

/// The tree mounted at `m` in the test's namespace, as seen from the host.
pub fn host_view(env: &Env, m: &Path) -> PathBuf {
    PathBuf::from(format!("/proc/{}/root{}", env.pid, m.display()))
}

/// `sharedloop import SOURCE` with the test's store, and `extra` after.
pub fn import_args(env: &Env, source: &str, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = vec![
        BIN.into(),
        "import".into(),
        source.into(),
        "--loopback-root".into(),
        env.root.to_string_lossy().into(),
        "--loopback-fallback".into(),
        env.fallback.to_string_lossy().into(),
    ];
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// The layer format `add` and `import` write here when not told (what
/// `status` reports: erofs where the kernel has it, else ext4).
pub fn default_layer_fstype(env: &Env) -> String {
    let r = env.run(&[BIN, "status", "--json"]);
    r.ok();
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    let s = v["kernel"]["layer_fstype"].as_str().expect("kernel.layer_fstype").to_string();
    s.split_whitespace().next().unwrap().to_string()
}

impl Env {
    /// Pin the layer format of every `add` and `import` of this test with
    /// `layer_fstype=` in a configuration file of its own (tests whose
    /// checks are about one format: e2fsck, ext4 output columns).
    pub fn pin_layer_fstype(&mut self, fstype: &str) {
        let cfg = self.dir.join("layer-fstype.conf");
        std::fs::write(&cfg, format!("# this test's layers\nlayer_fstype={fstype}\n")).unwrap();
        self.envs.push(("SHAREDLOOP_CONFIG".into(), cfg.to_string_lossy().into()));
    }
}

/// `sh -c SCRIPT` in `dir`; its stdout. Fails the test with both outputs.
pub fn sh(script: &str, dir: &Path) -> String {
    let out = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().expect("run sh");
    assert!(
        out.status.success(),
        "{script}\nfailed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fail the test, saying what to install, when `tool` is not on PATH.
pub fn need(tool: &str) {
    let ok = Command::new("sh").arg("-c").arg(format!("command -v {tool}")).stdout(Stdio::null()).status().unwrap().success();
    assert!(ok, "{tool} is needed for these tests: run scripts/install-deps.sh");
}
