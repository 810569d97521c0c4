//! A real GlusterFS volume on this one machine, used by several "nodes",
//! for the tests of a store on shared storage.
//!
//! Everything lives in namespaces the test makes and nothing outside them
//! is touched:
//! - the cluster holder runs under `unshare -m -n -u -p --fork --kill-child
//!   --mount-proc`: glusterd's fixed state directories (and /run, where it
//!   puts its socket) are tmpfs in its private mount namespace; the brick address (10.213.0.1/32) sits on the
//!   `lo` of its private network namespace, so no packet leaves it (and no
//!   address of the host is ever used); and every glusterd, brick and
//!   client process is in its PID namespace, so killing the holder (or the
//!   test process dying: `--kill-child`) takes them all down;
//! - each node has its own FUSE client mount of the volume (its own
//!   st_dev, page cache and locks, as a second machine would have), and
//!   enters the cluster's network and PID namespaces with a mount and UTS
//!   namespace of its own: its own hostname, state directory and fallback
//!   store, and only its own client's store. A node is an [`Env`], so every
//!   helper of the harness works on it. (The client processes stay in the
//!   cluster's mount namespace: see [`Cluster::node`] for why.)
//!
//! Teardown: nodes first (their `Env` drop), then the cluster's PID
//! namespace is killed and waited for; the bricks live in the test's
//! directory, removed at the end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{Env, Run, descendant_running, holder_script, spawn_holder};

/// The brick address, on the cluster namespace's own `lo`. GlusterFS
/// refuses 127.x and "localhost" for bricks.
pub const ADDR: &str = "10.213.0.1";
pub const VOLUME: &str = "store";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One brick.
    Single,
    /// Two bricks, each file on both (replica 2).
    Replica2,
}

pub struct Cluster {
    pub dir: PathBuf,
    /// `unshare`, the direct child; its death kills the PID namespace.
    holder: Child,
    /// PID 1 of the cluster's PID namespace (host pid): the nsenter target.
    pub pid: u32,
    pid_ns: u64,
    pub layout: Layout,
}

fn ns_inode(pid: u32, ns: &str) -> Option<u64> {
    std::fs::metadata(format!("/proc/{pid}/ns/{ns}")).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m))
}

/// Host pids of the processes in the namespace `ns` (e.g. "pid", "mnt")
/// whose inode is `inode`.
pub fn pids_in_ns(ns: &str, inode: u64) -> Vec<u32> {
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if ns_inode(pid, ns) == Some(inode) {
            out.push(pid);
        }
    }
    out
}

impl Cluster {
    /// glusterd running, one volume created with `options` set, started.
    pub fn new(name: &str, layout: Layout, options: &[(&str, &str)]) -> Cluster {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "sl-cluster-{name}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = format!(
            "set -e
             mount -t tmpfs -o mode=0755 tmpfs /run
             for d in /var/lib/glusterd /var/log/glusterfs; do mkdir -p $d; mount -t tmpfs -o mode=0755 tmpfs $d; done
             hostname sl-cluster
             ip link set lo up
             ip addr add {ADDR}/32 dev lo
             glusterd --pid-file={d}/glusterd.pid -l {d}/glusterd.log
             i=0; until gluster --mode=script pool list >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 100 ] || exit 1; sleep 0.1; done
             echo ready
             exec sleep 100000",
            d = dir.display()
        );
        let mut c = Command::new("unshare");
        c.args(["-m", "-n", "-u", "-p", "--fork", "--kill-child", "--mount-proc", "--propagation", "private", "--", "sh", "-c", &script]);
        let mut holder = spawn_holder(c, "glusterd");
        let Some(pid) = descendant_running(holder.id(), "sleep") else {
            let _ = holder.kill();
            let _ = holder.wait();
            panic!("cluster holder did not start");
        };
        let pid_ns = ns_inode(pid, "pid").expect("pid namespace");
        let cluster = Cluster { dir, holder, pid, pid_ns, layout };
        let bricks: Vec<String> = match layout {
            Layout::Single => vec![cluster.brick(0)],
            Layout::Replica2 => vec![cluster.brick(0), cluster.brick(1)],
        };
        let mut args = vec!["volume", "create", VOLUME];
        if layout == Layout::Replica2 {
            args.extend(["replica", "2"]);
        }
        let bricks_ref: Vec<&str> = bricks.iter().map(String::as_str).collect();
        args.extend(bricks_ref);
        args.push("force");
        cluster.gluster(&args).ok();
        for (k, v) in options {
            cluster.gluster(&["volume", "set", VOLUME, k, v]).ok();
        }
        cluster.gluster(&["volume", "start", VOLUME]).ok();
        cluster
    }

    fn brick(&self, i: usize) -> String {
        let p = self.dir.join(format!("brick{i}"));
        std::fs::create_dir_all(&p).unwrap();
        format!("{ADDR}:{}", p.display())
    }

    /// `gluster --mode=script ARGS` in the cluster's namespaces.
    pub fn gluster(&self, args: &[&str]) -> Run {
        let o = Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-m", "-n", "-u", "-p", "--", "gluster", "--mode=script"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run gluster");
        Run::from(o)
    }

    /// A node: its own mount and UTS namespace, hostname `node-NAME`, FUSE
    /// client mount of the volume at `DIR/node-NAME/store`, store root
    /// `store/root` on the volume, fallback and state on local disk.
    /// `mount_opts`: extra glusterfs client options ("" for none).
    ///
    /// The client is mounted from the cluster's mount namespace and the
    /// node's namespace made after it (keeping only its own store): the
    /// FUSE server must never be a member of a mount namespace holding
    /// mounts that need it (an overlay whose upper is a loop device on a
    /// file of that FUSE mount). If it were and died last, tearing the
    /// namespace down would sync that upper through itself and hang in D
    /// state for ever, with every later `sync` on the machine behind it.
    pub fn node(&self, name: &str, mount_opts: &str) -> Env {
        let dir = self.dir.join(format!("node-{name}"));
        let store = dir.join("store");
        std::fs::create_dir_all(&store).unwrap();
        let opts = if mount_opts.is_empty() { String::new() } else { format!(",{mount_opts}") };
        let r = self.sh(&format!(
            "mount -t glusterfs -o log-file={log}{opts} {ADDR}:/{VOLUME} {store} && stat -f -c %T {store} | grep -q fuse",
            log = dir.join("client.log").display(),
            store = store.display(),
        ));
        assert_eq!(r.code, 0, "mount the volume for node {name}: {r:?}");
        // Other nodes' stores are theirs: not in this node's namespace.
        let pre = format!(
            "hostname node-{name}; grep ' fuse.glusterfs ' /proc/self/mountinfo | cut -d' ' -f5 | grep -vx '{store}' | xargs -r -n1 umount -l;",
            store = store.display(),
        );
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid.to_string(), "-m", "-n", "-p", "--"])
            .args(["unshare", "-m", "-u", "--propagation", "private", "--", "sh", "-c", &holder_script(&dir, &pre)]);
        Env::with_holder(dir, store.join("root"), c, vec!["-m", "-u", "-n", "-p"])
    }

    /// A shell command in the cluster's own namespaces.
    pub fn sh(&self, script: &str) -> Run {
        let o = Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-m", "-n", "-u", "-p", "--", "sh", "-c", script])
            .stdin(Stdio::null())
            .output()
            .expect("run sh in the cluster");
        Run::from(o)
    }

    /// The node's FUSE client process: a glusterfs process of this
    /// cluster's PID namespace whose mount point is the node's store.
    pub fn client_pid(&self, node: &Env) -> Option<u32> {
        let store = node.dir.join("store");
        self.processes().into_iter().find(|p| {
            std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "glusterfs")
                && std::fs::read(format!("/proc/{p}/cmdline"))
                    .is_ok_and(|c| c.split(|&b| b == 0).rfind(|a| !a.is_empty()) == Some(store.as_os_str().as_encoded_bytes()))
        })
    }

    /// Kill the node's FUSE client with SIGKILL, as a node losing its
    /// client (or the machine) would; its mount then gives ENOTCONN/EIO.
    pub fn kill_client(&self, node: &Env) {
        let pid = self.client_pid(node).expect("node has a FUSE client");
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
        let t = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stop and start the volume (every brick process restarts and loses
    /// its lock table), then wait until `nodes` see the volume again.
    pub fn restart_volume(&self, nodes: &[&Env]) {
        self.gluster(&["volume", "stop", VOLUME, "force"]).ok();
        self.gluster(&["volume", "start", VOLUME, "force"]).ok();
        for n in nodes {
            let probe = n.root.join(".reconnect-probe");
            let t = Instant::now();
            loop {
                let r = n.sh(&format!("echo x > {p} && rm -f {p}", p = probe.display()));
                if r.code == 0 {
                    break;
                }
                assert!(t.elapsed() < Duration::from_secs(60), "node did not reconnect: {}", r.stderr);
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// Processes of the cluster still alive (glusterd, bricks, clients,
    /// node holders).
    pub fn processes(&self) -> Vec<u32> {
        pids_in_ns("pid", self.pid_ns)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // SIGKILL to the namespace's init kills every process in it; the
        // FUSE clients' death aborts their connections, so nothing can
        // hang on the volume afterwards.
        let _ = Command::new("kill").args(["-KILL", &self.pid.to_string()]).status();
        let _ = self.holder.kill();
        let _ = self.holder.wait();
        let t = Instant::now();
        while !self.processes().is_empty() && t.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let left = self.processes();
        if !std::thread::panicking() {
            assert!(left.is_empty(), "cluster processes left: {left:?}");
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
