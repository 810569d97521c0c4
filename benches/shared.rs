//! sharedloop on real shared storage: a GlusterFS volume served on this
//! machine by the multi-node harness of the tests (tests/common/cluster.rs:
//! glusterd, the brick and one FUSE client per "node", all inside
//! namespaces the bench makes; the brick address sits on the private
//! network namespace's own `lo`, so no packet leaves it). Side by side in
//! one process, alternating, each figure a median [min–max]:
//!
//! 1. **import**: `sharedloop import oci:LAYOUT:TAG` of an image built here
//!    with umoci (3 gzip layers: a 64 MiB file of random bytes, 5,000 small
//!    files, a 16 MiB file plus a deletion; about 98 MB of layer content)
//!    into a fresh empty store on the volume, against the same import into a
//!    fresh store on local disk (under the node's directory, same disk as
//!    the brick). Both use the node's local fallback store, so staging is
//!    node-local in both cases; the store is emptied between runs, untimed.
//! 2. **mount**: `mount -t sharedloop NAME T -o ...,upper=tmpfs` and
//!    `umount T`, store on the volume against store on local disk, for the
//!    3-layer image and a 32-layer chain of small layers made with
//!    `sharedloop add`; each mount is cold (nothing of the node attached:
//!    after every umount the bench waits until no loop device is backed by
//!    a file under the node's directory). Then a persistent upper
//!    (`upper=NAME`, created once untimed: on the volume it gets ext4
//!    multi-mount protection, on local disk not) with the 3-layer image.
//! 3. **concurrent import**: N nodes (default 8), each with its own FUSE
//!    client, start `sharedloop import` of the same image into one new,
//!    empty store directory on the volume at once (threads released by a
//!    barrier); against one node importing alone into a new directory, the
//!    two alternating. Checked after every run, untimed:
//!    - PASS/FAIL "concurrent import" (the store as published): every node
//!      exited 0 printing the chain ID, `layers/` holds exactly the chain's
//!      IDs, `tmp/` is empty, `names/TAG` names the top, no node's fallback
//!      got a layer or kept staging;
//!    - PASS/FAIL "use right after the imports": as soon as all have
//!      returned, every node mounts the image by name once (then, if that
//!      failed, again every 100 ms to report how long until it works), and
//!      node 0 runs `sharedloop verify TAG`.
//!
//!    The bench exits 1 if any check fails (also leftovers at the end).
//!    CPU seconds of sharedloop (children of the bench) and of the
//!    cluster's processes are reported for imports.
//!
//! Every command runs inside the node's namespaces through `nsenter` (the
//! harness's `Env::run`), so each figure includes nsenter's start-up; the
//! report gives its median (`true` run the same way).
//!
//! Run as root (GlusterFS server and client, umoci):
//!
//! ```text
//! cargo bench --bench shared                       # REPS=5, 8 nodes
//! cargo bench --bench shared -- --quick            # small image, 3 reps, 3 nodes, 8-layer chain
//! cargo bench --bench shared -- --reps 9 --nodes 4
//! ```
//!
//! For digging into a result:
//!
//! ```text
//! -- --same-dir                  # section 3 empties and reuses one store directory
//!                                # (removed and made again by node 0) instead of a new one
//! -- --volume-option KEY=VALUE   # `gluster volume set` before the start (repeatable)
//! -- --exec 'SCRIPT'             # no measurements: run SCRIPT on node 0 once both stores
//!                                # hold the image and the chain (see `exec_script`), e.g.
//!    'SHAREDLOOP_DEBUG=1 mount -t sharedloop chain $SL_MNT -o $SL_SHARED,upper=tmpfs; umount $SL_MNT'
//!    'gluster --mode=script volume profile store start; ...'   # brick-side FOP counts
//! ```
//!
//! Teardown is the harness's: the nodes' `Env`s (namespace holders; their
//! loop devices go by autoclear), then the cluster's PID namespace, then
//! the directories. At its end the bench checks that no loop device is
//! backed by a file under its directories and no process of the cluster is
//! left.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, Layout};
use common::{BIN, Env, Run, loops_under, wait_no_loops};
#[path = "util/mod.rs"]
mod util;
use util::{Pressure, Work, umoci_image};

// ---------------------------------------------------------------- arguments

struct Args {
    reps: usize,
    nodes: usize,
    quick: bool,
    /// `--same-dir`: section 3 empties and reuses one store directory
    /// (through node 0) instead of a new one per run.
    same_dir: bool,
    /// `--volume-option KEY=VALUE` (repeatable): `gluster volume set` for
    /// experiments.
    volume_options: Vec<(String, String)>,
    /// `--exec SCRIPT`: no measurements; run SCRIPT with sh on node 0 once
    /// both stores hold the image and the chain (see `exec_script`).
    exec: Option<String>,
}

fn parse_args() -> Args {
    let mut quick = false;
    let mut reps = None;
    let mut nodes = None;
    let mut same_dir = false;
    let mut volume_options = vec![];
    let mut exec = None;
    let mut it = std::env::args().skip(1);
    let num = |k: &str, v: Option<String>| -> usize {
        v.and_then(|v| v.parse::<usize>().ok()).filter(|&n| n > 0).unwrap_or_else(|| usage(&format!("{k} wants a positive number")))
    };
    while let Some(arg) = it.next() {
        let (k, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        match k.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--quick" => quick = true,
            "--same-dir" => same_dir = true,
            "--exec" => exec = Some(inline.or_else(|| it.next()).unwrap_or_else(|| usage("--exec needs a script"))),
            "--volume-option" => {
                let v = inline.or_else(|| it.next()).unwrap_or_default();
                let Some((k, v)) = v.split_once('=') else { usage("--volume-option wants KEY=VALUE") };
                volume_options.push((k.to_string(), v.to_string()));
            }
            "--reps" => reps = Some(num("--reps", inline.or_else(|| it.next()))),
            "--nodes" => nodes = Some(num("--nodes", inline.or_else(|| it.next()))),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    Args { reps: reps.unwrap_or(if quick { 3 } else { 5 }), nodes: nodes.unwrap_or(if quick { 3 } else { 8 }), quick, same_dir, volume_options, exec }
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("shared bench: {msg}");
    }
    eprintln!("usage: cargo bench --bench shared -- [--quick] [--reps N] [--nodes N] [--same-dir] [--volume-option KEY=VALUE]...");
    eprintln!("       cargo bench --bench shared -- [--quick] --exec SCRIPT");
    std::process::exit(2);
}

// ---------------------------------------------------------------- figures

/// Seconds of each repetition.
#[derive(Default, Clone)]
struct Series(Vec<f64>);

impl Series {
    fn push(&mut self, d: Duration) {
        self.0.push(d.as_secs_f64());
    }
    fn sorted(&self) -> Vec<f64> {
        let mut v = self.0.clone();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    }
    fn median(&self) -> f64 {
        let v = self.sorted();
        let n = v.len();
        if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
    }
    /// "5.63 s [5.41–6.02]" (seconds) or "17.1 ms [...]" (milliseconds).
    fn cell(&self, ms: bool) -> String {
        let v = self.sorted();
        let f = |x: f64| if ms { fmt3(x * 1e3) } else { format!("{x:.2}") };
        format!("{} {} [{}–{}]", f(self.median()), if ms { "ms" } else { "s" }, f(v[0]), f(v[v.len() - 1]))
    }
}

/// Three significant digits.
fn fmt3(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

fn ratio(shared: &Series, local: &Series) -> f64 {
    shared.median() / local.median()
}

fn verdict(r: f64, target: f64) -> &'static str {
    if r <= target { "met" } else { "**missed**" }
}

/// PSI "some" totals (µs) of cpu and io, to tell outside load apart.
/// CPU seconds used so far by this process's waited-for children (every
/// command is a child: nsenter waits for what it runs) and by the
/// cluster's processes (glusterd, brick, FUSE clients).
#[derive(Clone, Copy)]
struct Cpu {
    children: f64,
    gluster: f64,
}

fn stat_ticks(pid: &str, fields: &[usize]) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let Some((_, rest)) = s.rsplit_once(") ") else { return 0 };
    let f: Vec<&str> = rest.split_whitespace().collect();
    fields.iter().filter_map(|&i| f.get(i)?.parse::<u64>().ok()).sum()
}

impl Cpu {
    fn now(cluster: &Cluster) -> Cpu {
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        // After "comm) ": state is field 0, utime 11, stime 12, cutime 13, cstime 14.
        let children = stat_ticks("self", &[13, 14]) as f64 / hz;
        let gluster = cluster.processes().iter().map(|p| stat_ticks(&p.to_string(), &[11, 12])).sum::<u64>() as f64 / hz;
        Cpu { children, gluster }
    }
    fn since(&self, cluster: &Cluster) -> Cpu {
        let n = Cpu::now(cluster);
        Cpu { children: n.children - self.children, gluster: n.gluster - self.gluster }
    }
}

/// Dirty and writeback page cache (MB), for the progress lines: the runs
/// write GBs to the one local disk.
fn dirty_mb() -> String {
    let m = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let kb = |k: &str| -> u64 {
        m.lines().find(|l| l.starts_with(k)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()).unwrap_or(0)
    };
    format!("dirty {} MB, writeback {} MB", kb("Dirty:") / 1024, kb("Writeback:") / 1024)
}

// ---------------------------------------------------------------- helpers

#[track_caller]
fn ok(r: Run, what: &str) -> Run {
    assert_eq!(r.code, 0, "{what}: exit {}: {}{}", r.code, r.stdout, r.stderr);
    r
}


fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).unwrap()
}

/// The chain IDs of a tag's layers, bottom first (OCI rule), and the
/// layers' compressed and uncompressed sizes.
fn chain_of(layout: &Path, tag: &str) -> (Vec<String>, u64, u64) {
    use sha2::Digest as _;
    let blob = |d: &str| layout.join("blobs/sha256").join(d.trim_start_matches("sha256:"));
    let idx = json(&layout.join("index.json"));
    let m = idx["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("no tag {tag} in {}", layout.display()));
    let man = json(&blob(m["digest"].as_str().unwrap()));
    let cfg = json(&blob(man["config"]["digest"].as_str().unwrap()));
    let mut chain: Vec<String> = vec![];
    for d in cfg["rootfs"]["diff_ids"].as_array().unwrap() {
        let d = d.as_str().unwrap().to_string();
        let id = match chain.last() {
            None => d,
            Some(p) => format!("sha256:{}", hex::encode(sha2::Sha256::digest(format!("{p} {d}").as_bytes()))),
        };
        chain.push(id);
    }
    let (mut packed, mut content) = (0, 0);
    for l in man["layers"].as_array().unwrap() {
        let p = blob(l["digest"].as_str().unwrap());
        packed += std::fs::metadata(&p).unwrap().len();
        let out = Command::new("sh").args(["-c", &format!("gzip -dc {} | wc -c", p.display())]).output().unwrap();
        content += String::from_utf8_lossy(&out.stdout).trim().parse::<u64>().unwrap();
    }
    (chain, packed, content)
}

/// A store: root (on the volume or on local disk) and the node's fallback.
#[derive(Clone)]
struct Store {
    root: PathBuf,
    fallback: PathBuf,
}

impl Store {
    fn args(&self) -> Vec<String> {
        vec![
            "--loopback-root".into(),
            self.root.to_string_lossy().into(),
            "--loopback-fallback".into(),
            self.fallback.to_string_lossy().into(),
        ]
    }
    fn opts(&self) -> String {
        format!("loopback_root={},loopback_fallback={}", self.root.display(), self.fallback.display())
    }
}

fn import_argv(src: &str, s: &Store) -> Vec<String> {
    let mut v: Vec<String> = vec![BIN.into(), "import".into(), "--quiet".into(), src.into()];
    v.extend(s.args());
    v
}

fn run_v(env: &Env, v: &[String]) -> Run {
    env.run(&v.iter().map(String::as_str).collect::<Vec<_>>())
}

/// Names in a directory of the node's view (empty if it does not exist).
fn entries(env: &Env, dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(env.view(dir)).map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect()).unwrap_or_default()
}

/// Make a store root empty (untimed): remove it and create it again, from
/// inside the node (a volume path is only mounted in its namespace).
fn wipe(env: &Env, root: &Path) {
    let r = root.to_str().unwrap();
    ok(env.run(&["sh", "-c", "rm -rf \"$1\" && mkdir -p \"$1\"", "wipe", r]), "empty the store");
}

/// Leftovers of a node's fallback staging (`tmp/`), which must stay empty.
fn fallback_tmp(env: &Env) -> BTreeSet<String> {
    entries(env, &env.fallback.join("tmp"))
}

/// One cold mount and its umount, each timed (the merged view checked in
/// between, untimed); then wait, untimed, until no loop device backed by a
/// file under the node's directory is attached, so the next mount is cold.
fn mount_cycle(env: &Env, src: &str, target: &Path, opts: &str, check: &str) -> (Duration, Duration) {
    let t = Instant::now();
    ok(env.run(&["mount", "-t", "sharedloop", src, target.to_str().unwrap(), "-o", opts]), "mount");
    let m = t.elapsed();
    assert!(env.overlay_at(target).is_some(), "no overlay at {}", target.display());
    assert!(env.view(&target.join(check)).exists(), "{check} missing in the merged view of {src}");
    let t = Instant::now();
    ok(env.run(&["umount", target.to_str().unwrap()]), "umount");
    let u = t.elapsed();
    assert!(wait_no_loops(&env.dir, Duration::from_secs(20)), "loop devices still attached after umount: {:?}", env.my_loops());
    (m, u)
}

// ---------------------------------------------------------------- sections

struct ImportResult {
    shared: Series,
    local: Series,
    /// CPU seconds per run: sharedloop (and nsenter), the cluster's processes.
    shared_cpu: (Series, Series),
    local_cpu: (Series, Series),
}

fn bench_import(cluster: &Cluster, node: &Env, src: &str, chain: &[String], shared: &Store, local: &Store, reps: usize) -> ImportResult {
    let mut r = ImportResult {
        shared: Series::default(),
        local: Series::default(),
        shared_cpu: Default::default(),
        local_cpu: Default::default(),
    };
    let top = chain.last().unwrap();
    // One untimed warm-up of each (page cache of the layout, the binary).
    for rep in 0..=reps {
        // Alternate which goes first.
        let order: [(&Store, bool); 2] = if rep % 2 == 0 { [(shared, true), (local, false)] } else { [(local, false), (shared, true)] };
        for (s, is_shared) in order {
            wipe(node, &s.root);
            let cpu = Cpu::now(cluster);
            let t = Instant::now();
            let out = ok(run_v(node, &import_argv(src, s)), "import");
            let d = t.elapsed();
            let cpu = cpu.since(cluster);
            assert_eq!(out.stdout.trim(), top, "import printed another chain");
            assert_eq!(entries(node, &s.root.join("layers")).len(), chain.len());
            assert!(fallback_tmp(node).is_empty(), "staging left: {:?}", fallback_tmp(node));
            eprintln!(
                "  import {} rep {rep}: {:.2} s (CPU: sharedloop {:.2} s, glusterfs {:.2} s)",
                if is_shared { "shared" } else { "local " },
                d.as_secs_f64(),
                cpu.children,
                cpu.gluster
            );
            if rep > 0 {
                let (times, cpus) = if is_shared { (&mut r.shared, &mut r.shared_cpu) } else { (&mut r.local, &mut r.local_cpu) };
                times.push(d);
                cpus.0.0.push(cpu.children);
                cpus.1.0.push(cpu.gluster);
            }
        }
    }
    r
}

struct MountRow {
    what: String,
    shared_mount: Series,
    shared_umount: Series,
    local_mount: Series,
    local_umount: Series,
}

/// Section 2, one row: `stores` is (on the volume, on local disk).
fn bench_mount(node: &Env, what: &str, src: &str, check: &str, extra: &str, stores: (&Store, &Store), reps: usize) -> MountRow {
    let (shared, local) = stores;
    let mut row = MountRow {
        what: what.into(),
        shared_mount: Series::default(),
        shared_umount: Series::default(),
        local_mount: Series::default(),
        local_umount: Series::default(),
    };
    let target = node.mnt("t");
    for rep in 0..=reps {
        let order: [(&Store, bool); 2] = if rep % 2 == 0 { [(shared, true), (local, false)] } else { [(local, false), (shared, true)] };
        for (s, is_shared) in order {
            let opts = format!("{},{extra}", s.opts());
            let (m, u) = mount_cycle(node, src, &target, &opts, check);
            if rep > 0 {
                if is_shared {
                    row.shared_mount.push(m);
                    row.shared_umount.push(u);
                } else {
                    row.local_mount.push(m);
                    row.local_umount.push(u);
                }
            }
        }
    }
    eprintln!(
        "  {what}: mount shared {} local {}; umount shared {} local {}",
        row.shared_mount.cell(true),
        row.local_mount.cell(true),
        row.shared_umount.cell(true),
        row.local_umount.cell(true)
    );
    row
}

struct ConcResult {
    alone: Series,
    together: Series,
    /// CPU seconds per run (sharedloop, glusterfs), alone and together.
    alone_cpu: (Series, Series),
    together_cpu: (Series, Series),
    /// Per node, each rep: (exit code, seconds).
    per_node: Vec<Vec<(i32, f64)>>,
    failures: Failures,
}

/// What went wrong in section 3: the published store (the brief's
/// criteria), and using the image right after the imports returned.
#[derive(Default)]
struct Failures {
    publish: Vec<String>,
    use_after: Vec<String>,
}

/// Run `argv` on `n` until it exits 0, every 100 ms for at most 20 s:
/// how long it took to start working, and how many tries.
fn until_ok(n: &Env, argv: &[&str]) -> (Option<Duration>, usize) {
    let t = Instant::now();
    let mut tries = 0;
    while t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(100));
        tries += 1;
        if n.run(argv).code == 0 {
            return (Some(t.elapsed()), tries);
        }
    }
    (None, tries)
}

/// What the brick itself holds below the store directory `dir` of node
/// `n` (`DIR/node-X/store/REL` is `CLUSTER/brick0/REL`), bypassing every
/// client cache.
fn cluster_brick_list(n: &Env, dir: &Path) -> String {
    let store = n.dir.join("store");
    let (Ok(rel), Some(cluster)) = (dir.strip_prefix(&store), n.dir.parent()) else { return "brick: ?".into() };
    let b = cluster.join("brick0").join(rel);
    match std::fs::read_dir(&b) {
        Ok(r) => format!("the brick holds {:?}", r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect::<BTreeSet<_>>()),
        Err(e) => format!("brick {}: {e}", b.display()),
    }
}

/// Check the shared store after an import of `chain` by `nodes` (all
/// exited): first what a user does next, once, at once (every node mounts
/// the image by name; node 0 runs `sharedloop verify`), then the store's
/// contents.
fn check_store(nodes: &[Env], roots: &[Store], chain: &[String], tag: &str, f: &mut Failures, what: &str) {
    let (n0, s0) = (&nodes[0], &roots[0]);
    for (n, s) in nodes.iter().zip(roots) {
        let target = n.mnt("c");
        let opts = format!("{},upper=tmpfs", s.opts());
        let argv = ["mount", "-t", "sharedloop", tag, target.to_str().unwrap(), "-o", &opts];
        let t = Instant::now();
        let r = n.run(&argv);
        if r.code != 0 {
            let took = t.elapsed();
            // What this node's client lists in names/ against the brick.
            let listed = entries(n, &s.root.join("names"));
            let brick = cluster_brick_list(n, &s.root.join("names"));
            let (later, tries) = until_ok(n, &argv);
            f.use_after.push(format!(
                "{what}: {}: `mount -t sharedloop {tag}` right after the import: exit {} after {:.0} ms: {} [the node lists names/ {listed:?}, {brick}] (then {})",
                n.dir.file_name().unwrap().to_string_lossy(),
                r.code,
                took.as_secs_f64() * 1e3,
                r.stderr.trim(),
                match later {
                    Some(d) => format!("worked {:.1} s later, try {tries}", d.as_secs_f64()),
                    None => format!("still failing after {tries} tries in 20 s"),
                }
            ));
            if later.is_none() {
                continue;
            }
        }
        if !n.view(&target.join("big/second")).exists() {
            f.use_after.push(format!("{what}: {}: big/second missing in the merged view", n.dir.display()));
        }
        ok(n.run(&["umount", target.to_str().unwrap()]), "umount");
    }
    for n in nodes {
        assert!(wait_no_loops(&n.dir, Duration::from_secs(20)), "loop devices still attached: {:?}", n.my_loops());
    }
    let mut v: Vec<String> = vec![BIN.into(), "verify".into(), tag.into()];
    v.extend(s0.args());
    let argv: Vec<&str> = v.iter().map(String::as_str).collect();
    let r = n0.run(&argv);
    if r.code != 0 {
        let (later, tries) = until_ok(n0, &argv);
        f.use_after.push(format!(
            "{what}: n0: `sharedloop verify {tag}`: exit {}: {} (then {})",
            r.code,
            (r.stdout.trim().to_string() + " " + r.stderr.trim()).replace('\n', " "),
            match later {
                Some(d) => format!("passed {:.1} s later, try {tries}", d.as_secs_f64()),
                None => format!("still failing after {tries} tries in 20 s"),
            }
        ));
    }

    let want: BTreeSet<String> = chain.iter().map(|c| c.trim_start_matches("sha256:").to_string()).collect();
    let layers = entries(n0, &s0.root.join("layers"));
    if layers != want {
        f.publish.push(format!("{what}: layers/ holds {layers:?}, want exactly {want:?}"));
    }
    // tmp/ as node 0 lists it; if not empty, list again for up to 5 s (a
    // client may list entries another node has just removed) and from every
    // node, so the report tells a leftover from a stale listing.
    let tmp = entries(n0, &s0.root.join("tmp"));
    if !tmp.is_empty() {
        let t = Instant::now();
        let mut now = tmp.clone();
        while !now.is_empty() && t.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(250));
            now = entries(n0, &s0.root.join("tmp"));
        }
        let others: Vec<String> = nodes
            .iter()
            .zip(roots)
            .map(|(n, s)| format!("{} lists {}", n.dir.file_name().unwrap().to_string_lossy(), entries(n, &s.root.join("tmp")).len()))
            .collect();
        let brick = cluster_brick_list(n0, &s0.root.join("tmp"));
        if now.is_empty() {
            eprintln!("  note: {what}: tmp/ listed {tmp:?} right after the imports, empty {:.2} s later", t.elapsed().as_secs_f64());
        } else {
            f.publish.push(format!(
                "{what}: tmp/ not empty: {tmp:?}; still {} entries {:.0} s later ({}; {brick})",
                now.len(),
                t.elapsed().as_secs_f64(),
                others.join(", ")
            ));
        }
    }
    // The record as published: node 0's client may answer ESTALE or
    // ENOENT for a while if it cached the record another node replaced
    // (see the checks above), so read until it settles.
    let rec = n0.view(&s0.root.join("names").join(tag));
    let t = Instant::now();
    let mut name = std::fs::read_to_string(&rec);
    while name.as_ref().is_err_and(|e| matches!(e.raw_os_error(), Some(libc::ESTALE) | Some(libc::ENOENT))) && t.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(50));
        name = std::fs::read_to_string(&rec);
    }
    if t.elapsed() > Duration::from_millis(20) {
        eprintln!("  note: {what}: names/{tag} unreadable from node 0 for {:.2} s", t.elapsed().as_secs_f64());
    }
    match name {
        Ok(n) if n.trim() == chain.last().unwrap() => {}
        Ok(n) => f.publish.push(format!("{what}: names/{tag} holds {n:?}, want {}", chain.last().unwrap())),
        Err(e) => f.publish.push(format!("{what}: names/{tag}: {e}")),
    }
    for (n, s) in nodes.iter().zip(roots) {
        let fb = entries(n, &s.fallback.join("layers"));
        if !fb.is_empty() {
            f.publish.push(format!("{what}: {} has layers in its fallback: {fb:?}", n.dir.display()));
        }
        let st = fallback_tmp(n);
        if !st.is_empty() {
            f.publish.push(format!("{what}: {} has staging left in its fallback: {st:?}", n.dir.display()));
        }
    }
}

/// Section 3. Each run imports into a new, empty directory of the volume
/// (`conc-REP-PHASE`, made by node 0), so no node has the directory in its
/// client's cache from an earlier run; with `same_dir` every run empties
/// and reuses `conc` instead.
fn bench_concurrent(cluster: &Cluster, nodes: &[Env], src: &str, chain: &[String], tag: &str, reps: usize, same_dir: bool) -> ConcResult {
    // The same directory of the volume, as each node sees it.
    let roots_of = |name: &str| -> Vec<Store> {
        nodes.iter().map(|n| Store { root: n.dir.join("store").join(name), fallback: n.fallback.clone() }).collect()
    };
    let mut r = ConcResult {
        alone: Series::default(),
        together: Series::default(),
        alone_cpu: Default::default(),
        together_cpu: Default::default(),
        per_node: vec![vec![]; nodes.len()], failures: Failures::default() };
    let top = chain.last().unwrap().clone();
    for rep in 0..reps {
        let alone_first = rep % 2 == 0;
        for phase in 0..2 {
            let alone = (phase == 0) == alone_first;
            let roots = roots_of(&if same_dir { "conc".to_string() } else { format!("conc-{rep}-{phase}") });
            wipe(&nodes[0], &roots[0].root);
            let cpu = Cpu::now(cluster);
            if alone {
                let t = Instant::now();
                let out = run_v(&nodes[0], &import_argv(src, &roots[0]));
                let d = t.elapsed();
                let cpu = cpu.since(cluster);
                r.alone_cpu.0.0.push(cpu.children);
                r.alone_cpu.1.0.push(cpu.gluster);
                if out.code != 0 || out.stdout.trim() != top {
                    r.failures.publish.push(format!("rep {rep}: one node alone: exit {}: {}{}", out.code, out.stdout, out.stderr));
                }
                check_store(&nodes[..1], &roots[..1], chain, tag, &mut r.failures, &format!("rep {rep}, one node"));
                eprintln!(
                    "  import by one node alone, rep {rep}: {:.2} s (CPU: sharedloop {:.1} s, glusterfs {:.1} s)",
                    d.as_secs_f64(),
                    cpu.children,
                    cpu.gluster
                );
                r.alone.push(d);
                if !same_dir {
                    ok(nodes[0].run(&["rm", "-rf", roots[0].root.to_str().unwrap()]), "remove store");
                }
                continue;
            }
            let barrier = Arc::new(Barrier::new(nodes.len()));
            let start = Instant::now();
            let results: Vec<(i32, String, String, Duration)> = std::thread::scope(|sc| {
                let hs: Vec<_> = nodes
                    .iter()
                    .zip(&roots)
                    .map(|(n, s)| {
                        let mut c = n.command(&import_argv(src, s).iter().map(String::as_str).collect::<Vec<_>>());
                        c.stdout(Stdio::piped()).stderr(Stdio::piped());
                        let b = barrier.clone();
                        sc.spawn(move || {
                            b.wait();
                            let t = Instant::now();
                            let o = c.output().expect("spawn import");
                            (
                                o.status.code().unwrap_or(-1),
                                String::from_utf8_lossy(&o.stdout).into_owned(),
                                String::from_utf8_lossy(&o.stderr).into_owned(),
                                t.elapsed(),
                            )
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let wall = start.elapsed();
            let cpu = cpu.since(cluster);
            let dirty = dirty_mb();
            r.together_cpu.0.0.push(cpu.children);
            r.together_cpu.1.0.push(cpu.gluster);
            for (i, (code, out, err, d)) in results.iter().enumerate() {
                r.per_node[i].push((*code, d.as_secs_f64()));
                if *code != 0 || out.trim() != top {
                    r.failures.publish.push(format!("rep {rep}: node {i}: exit {code}, printed {:?}: {}", out.trim(), err.trim()));
                }
            }
            check_store(nodes, &roots, chain, tag, &mut r.failures, &format!("rep {rep}, {} nodes", nodes.len()));
            let codes: Vec<String> = results.iter().map(|x| x.0.to_string()).collect();
            eprintln!(
                "  import by {} nodes at once, rep {rep}: {:.2} s (exit codes {}; CPU: sharedloop {:.1} s, glusterfs {:.1} s; {})",
                nodes.len(),
                wall.as_secs_f64(),
                codes.join(","),
                cpu.children,
                cpu.gluster,
                dirty
            );
            r.together.push(wall);
            if !same_dir {
                ok(nodes[0].run(&["rm", "-rf", roots[0].root.to_str().unwrap()]), "remove store");
            }
        }
    }
    r
}

/// `sharedloop add` of the small layers (`work/small/NN`), one on the
/// other, the top named `chain`; returns the time it took.
fn add_chain(node: &Env, s: &Store, work: &Path, n: usize) -> Duration {
    let t = Instant::now();
    let mut parent: Option<String> = None;
    for k in 0..n {
        let mut v: Vec<String> = vec![BIN.into(), "add".into(), work.join(format!("small/{k:02}")).to_string_lossy().into()];
        v.extend(s.args());
        if let Some(p) = &parent {
            v.extend(["--parent".into(), p.clone()]);
        }
        if k == n - 1 {
            v.extend(["--name".into(), "chain".into()]);
        }
        parent = Some(ok(run_v(node, &v), "add").stdout.trim().to_string());
    }
    t.elapsed()
}

/// `--exec SCRIPT`: run SCRIPT with sh on node 0 (its mount, UTS, network
/// and PID namespaces), stdout and stderr passed through, with both stores
/// holding the image (name `$SL_IMAGE`) and the chain (name `chain`):
/// `$SL_BIN` the binary, `$SL_SHARED` / `$SL_LOCAL` the store options for
/// `mount -o` (`loopback_root=...,loopback_fallback=...`),
/// `$SL_SHARED_ROOT` / `$SL_LOCAL_ROOT` / `$SL_FALLBACK` the directories,
/// `$SL_SRC` the image for `sharedloop import`, `$SL_MNT` an empty
/// directory to mount on, `$SL_NODE_DIR` the node's directory;
/// `$SL_NODES`: every node as `PID:DIR` (PID as the script sees it, for
/// `nsenter -t PID -m -u -n -p`; the store on the volume is `DIR/store`).
/// Returns its exit code. Example: `--exec 'SHAREDLOOP_DEBUG=1 mount -t sharedloop chain $SL_MNT -o $SL_SHARED,upper=tmpfs; umount $SL_MNT'`.
fn exec_script(nodes: &[Env], shared: &Store, local: &Store, tag: &str, src: &str, script: &str) -> i32 {
    let node = &nodes[0];
    let mnt = node.mnt("exec");
    // A node holder's pid in the cluster's PID namespace: the last NSpid.
    let ns_pid = |n: &Env| {
        std::fs::read_to_string(format!("/proc/{}/status", n.pid))
            .ok()
            .and_then(|s| s.lines().find(|l| l.starts_with("NSpid:")).and_then(|l| l.split_whitespace().last().map(String::from)))
            .unwrap_or_default()
    };
    let all: Vec<String> = nodes.iter().map(|n| format!("{}:{}", ns_pid(n), n.dir.display())).collect();
    let mut c = node.command(&["sh", "-c", script]);
    c.env("SL_NODES", all.join(" "));
    c.env("SL_BIN", BIN)
        .env("SL_SHARED", shared.opts())
        .env("SL_LOCAL", local.opts())
        .env("SL_SHARED_ROOT", &shared.root)
        .env("SL_LOCAL_ROOT", &local.root)
        .env("SL_FALLBACK", &shared.fallback)
        .env("SL_IMAGE", tag)
        .env("SL_SRC", src)
        .env("SL_MNT", &mnt)
        .env("SL_NODE_DIR", &node.dir)
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    // Whatever the script leaves mounted goes with the node's namespace.
    c.status().map(|s| s.code().unwrap_or(-1)).unwrap_or(-1)
}

// ---------------------------------------------------------------- main

fn main() {
    let code = bench();
    std::process::exit(code);
}

fn bench() -> i32 {
    let started = Instant::now();
    let args = parse_args();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string();
    let gluster = Command::new("glusterfs")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).lines().next().unwrap_or("?").to_string())
        .unwrap_or_else(|e| format!("glusterfs: {e}"));
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    eprintln!("shared bench: {BIN}; kernel {kernel}; {gluster}; reps {}, nodes {}{}", args.reps, args.nodes, if args.quick { " (--quick)" } else { "" });

    // ------------------------------------------------------------ image
    let work = Work(std::env::temp_dir().join(format!("sl-shared-bench-{}", std::process::id())));
    let _ = std::fs::remove_dir_all(&work.0);
    std::fs::create_dir_all(&work.0).unwrap();
    let layout = work.0.join("layout");
    let (tag, small_layers) = if args.quick { ("quick", 8) } else { ("large", 32) };
    let t = Instant::now();
    if args.quick {
        umoci_image(
            &layout,
            tag,
            &[
                "mkdir -p big && head -c 8M /dev/urandom > big/blob",
                "mkdir -p many && for d in $(seq 1 5); do mkdir many/$d; for f in $(seq 1 60); do head -c $((1024 + (d * f) % 3072)) /dev/urandom > many/$d/$f; done; done",
                "head -c 2M /dev/urandom > big/second && rm -r many/1",
            ],
        );
    } else {
        umoci_image(
            &layout,
            tag,
            &[
                "mkdir -p big && head -c 64M /dev/urandom > big/blob",
                "mkdir -p many && for d in $(seq 1 50); do mkdir many/$d; for f in $(seq 1 100); do head -c $((1024 + (d * f) % 3072)) /dev/urandom > many/$d/$f; done; done",
                "head -c 16M /dev/urandom > big/second && rm -r many/1",
            ],
        );
    }
    let (chain, packed, content) = chain_of(&layout, tag);
    let src = format!("oci:{}:{tag}", layout.display());
    eprintln!(
        "  image {tag}: {} layers, {:.1} MB gzip, {:.1} MB of layer content (built in {:.1} s)",
        chain.len(),
        packed as f64 / 1e6,
        content as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    // The small layers of the chain made with `sharedloop add`.
    for k in 0..small_layers {
        let d = work.0.join(format!("small/{k:02}"));
        std::fs::create_dir_all(d.join("d")).unwrap();
        std::fs::write(d.join(format!("layer-{k:02}.txt")), format!("layer {k}\n")).unwrap();
        std::fs::write(d.join("d").join(format!("{k:02}")), vec![b'x'; 4096 + k * 64]).unwrap();
        std::fs::write(d.join("shared.txt"), format!("top is {k}\n")).unwrap();
    }

    // ------------------------------------------------------------ cluster
    let t = Instant::now();
    let mut vol_opts: Vec<(&str, &str)> = vec![("client.strict-locks", "on")];
    vol_opts.extend(args.volume_options.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    let cluster = Cluster::new("bench", Layout::Single, &vol_opts);
    let nodes: Vec<Env> = (0..args.nodes).map(|i| cluster.node(&format!("n{i}"), "")).collect();
    let n0 = &nodes[0];
    eprintln!("  cluster of {} nodes up in {:.1} s", nodes.len(), t.elapsed().as_secs_f64());
    let fs_type = n0.sh(&format!("findmnt -no FSTYPE -T {}", n0.dir.join("store").display())).stdout.trim().to_string();
    let local_fs = Command::new("findmnt")
        .args(["-no", "FSTYPE", "-T"])
        .arg(&n0.dir)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let shared = Store { root: n0.root.clone(), fallback: n0.fallback.clone() };
    let local = Store { root: n0.dir.join("local/root"), fallback: n0.fallback.clone() };
    if let Some(script) = &args.exec {
        for s in [&shared, &local] {
            wipe(n0, &s.root);
            ok(run_v(n0, &import_argv(&src, s)), "import");
            add_chain(n0, s, &work.0, small_layers);
        }
        let code = exec_script(&nodes, &shared, &local, tag, &src, script);
        drop(nodes);
        drop(cluster);
        return code;
    }
    let mut nsenter = Series::default();
    for _ in 0..9 {
        let t = Instant::now();
        ok(n0.run(&["true"]), "true");
        nsenter.push(t.elapsed());
    }
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default().split_whitespace().take(3).collect::<Vec<_>>().join(" ");
    let p1 = Pressure::now();

    // ------------------------------------------------------------ 1. import
    eprintln!("1. import ({} reps after one warm-up, alternating)", args.reps);
    let imp = bench_import(&cluster, n0, &src, &chain, &shared, &local, args.reps);

    let p1 = p1.report();
    let p2 = Pressure::now();

    // ------------------------------------------------------------ 2. mount
    // Both stores keep the image of the last import; add the small chain.
    eprintln!("2. mount (cold, {} reps after one warm-up, alternating)", args.reps);
    let add_times: Vec<Duration> = [&shared, &local].iter().map(|s| add_chain(n0, s, &work.0, small_layers)).collect();
    let last = format!("layer-{:02}.txt", small_layers - 1);
    let mut rows = vec![
        bench_mount(n0, &format!("{tag} image ({} layers), upper=tmpfs", chain.len()), tag, "big/second", "upper=tmpfs", (&shared, &local), args.reps),
        bench_mount(n0, &format!("chain of {small_layers} small layers, upper=tmpfs"), "chain", &last, "upper=tmpfs", (&shared, &local), args.reps),
    ];
    // A persistent upper: created by an untimed first mount on each side.
    let mut create = vec![];
    for s in [&shared, &local] {
        let target = n0.mnt("t");
        let (m, _) = mount_cycle(n0, tag, &target, &format!("{},upper=bench", s.opts()), "big/second");
        create.push(m);
    }
    let mmp = sharedloop::upper::mmp::read(std::fs::File::open(n0.view(&shared.root.join("uppers/bench.img"))).unwrap()).is_some();
    let mmp_local = sharedloop::upper::mmp::read(std::fs::File::open(n0.view(&local.root.join("uppers/bench.img"))).unwrap()).is_some();
    rows.push(bench_mount(
        n0,
        &format!(
            "{tag} image, persistent upper=NAME (ext4, 10G sparse; MMP {} on the volume, {} on local disk)",
            if mmp { "on" } else { "off" },
            if mmp_local { "on" } else { "off" }
        ),
        tag,
        "big/second",
        "upper=bench",
        (&shared, &local),
        args.reps,
    ));

    let p2 = p2.report();
    let p3 = Pressure::now();

    // ------------------------------------------------------------ 3. concurrent
    eprintln!("3. concurrent import by {} nodes ({} reps, alternating with one node alone)", nodes.len(), args.reps);
    let conc = bench_concurrent(&cluster, &nodes, &src, &chain, tag, args.reps, args.same_dir);
    let p3 = p3.report();

    // ------------------------------------------------------------ teardown
    let node_dirs: Vec<PathBuf> = nodes.iter().map(|n| n.dir.clone()).collect();
    let cluster_dir = cluster.dir.clone();
    drop(nodes);
    drop(cluster);
    let mut leaks = vec![];
    for d in node_dirs.iter().chain([&cluster_dir, &work.0]) {
        if !wait_no_loops(d, Duration::from_secs(10)) {
            leaks.push(format!("loop devices left: {:?}", loops_under(d)));
        }
    }
    if cluster_dir.exists() {
        leaks.push(format!("{} not removed", cluster_dir.display()));
    }

    // ------------------------------------------------------------ report
    let mut o = String::new();
    o.push_str("### sharedloop on shared storage (GlusterFS) vs local disk\n\n");
    o.push_str(&format!(
        "kernel {kernel}, {cpus} CPUs, {gluster} (one brick on local disk, FUSE clients, client.strict-locks on; \
         store {fs_type} vs local {local_fs}); REPS={}{}, median [min–max] after one untimed warm-up, the two sides alternating. \
         Every figure includes starting the command in the node's namespaces (nsenter: {}).\n\n",
        args.reps,
        if args.quick { " (--quick)" } else { "" },
        nsenter.cell(true)
    ));
    o.push_str(&format!(
        "Image `{tag}`: {} gzip layers, {:.1} MB compressed, {:.1} MB of layer content.\n\n",
        chain.len(),
        packed as f64 / 1e6,
        content as f64 / 1e6
    ));
    o.push_str("| measurement | store on GlusterFS | store on local disk | ratio shared/local | target ≤ 1.5x |\n");
    o.push_str("|---|---:|---:|---:|---|\n");
    let ri = ratio(&imp.shared, &imp.local);
    o.push_str(&format!(
        "| import into an empty store | {} | {} | {ri:.2}x | {} |\n",
        imp.shared.cell(false),
        imp.local.cell(false),
        verdict(ri, 1.5)
    ));
    for r in &rows {
        let rm = ratio(&r.shared_mount, &r.local_mount);
        let ru = ratio(&r.shared_umount, &r.local_umount);
        o.push_str(&format!(
            "| mount, {} | {} | {} | {rm:.2}x | {} |\n",
            r.what,
            r.shared_mount.cell(true),
            r.local_mount.cell(true),
            verdict(rm, 1.5)
        ));
        o.push_str(&format!("| umount, same | {} | {} | {ru:.2}x | |\n", r.shared_umount.cell(true), r.local_umount.cell(true)));
    }
    o.push_str(&format!(
        "\nCPU per import (median; sharedloop = the import and nsenter, glusterfs = glusterd, brick and FUSE clients): \
         {:.2} s + {:.2} s into the volume, {:.2} s + {:.2} s into local disk.\n",
        imp.shared_cpu.0.median(),
        imp.shared_cpu.1.median(),
        imp.local_cpu.0.median(),
        imp.local_cpu.1.median()
    ));
    o.push_str(&format!(
        "\nOnce, untimed above: `sharedloop add` of the {small_layers} small layers took {:.1} s on the volume and {:.1} s on local disk; \
         the first mount with `upper=bench` (creating the upper image) {:.0} ms on the volume and {:.0} ms on local disk.\n",
        add_times[0].as_secs_f64(),
        add_times[1].as_secs_f64(),
        create[0].as_secs_f64() * 1e3,
        create[1].as_secs_f64() * 1e3,
    ));

    o.push_str(&format!(
        "\n**Concurrent import** of `{tag}` into one empty store on the volume ({}):\n\n",
        if args.same_dir { "one directory emptied and made again by node 0 before each run" } else { "a new directory for each run" }
    ));
    o.push_str(
        "| nodes | wall time | slowest / fastest node (medians) | vs one node alone | CPU: sharedloop + glusterfs (medians) |\n\
         |---:|---:|---:|---:|---:|\n",
    );
    o.push_str(&format!(
        "| 1 | {} | | 1.00x | {:.1} s + {:.1} s |\n",
        conc.alone.cell(false),
        conc.alone_cpu.0.median(),
        conc.alone_cpu.1.median()
    ));
    let per_node_med: Vec<f64> = conc.per_node.iter().map(|v| Series(v.iter().map(|x| x.1).collect()).median()).collect();
    let (slow, fast) = per_node_med.iter().fold((0f64, f64::MAX), |(s, f), &x| (s.max(x), f.min(x)));
    o.push_str(&format!(
        "| {} | {} | {slow:.2} s / {fast:.2} s | {:.2}x | {:.1} s + {:.1} s |\n",
        conc.per_node.len(),
        conc.together.cell(false),
        ratio(&conc.together, &conc.alone),
        conc.together_cpu.0.median(),
        conc.together_cpu.1.median()
    ));
    let in_order = |v: &Series| v.0.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(", ");
    o.push_str(&format!(
        "\nRuns in order (s): one node {}; {} nodes {}.\n",
        in_order(&conc.alone),
        conc.per_node.len(),
        in_order(&conc.together)
    ));
    o.push_str("\nExit codes per node and rep: ");
    let codes: Vec<String> = conc
        .per_node
        .iter()
        .enumerate()
        .map(|(i, v)| format!("n{i}={}", v.iter().map(|x| x.0.to_string()).collect::<Vec<_>>().join("/")))
        .collect();
    o.push_str(&codes.join(" "));
    o.push('\n');
    o.push_str(&format!(
        "\nLoad average at the start {load}. Pressure (PSI \"some\", share of wall time) during 1. import {p1}; \
         2. mount {p2}; 3. concurrent {p3} \
         (the bench's own parallel work counts too).\n\
         binary {BIN}; total run {:.0} s\n",
        started.elapsed().as_secs_f64()
    ));
    let n = conc.per_node.len();
    let mut failed = false;
    let mut verdict_line = |o: &mut String, what: &str, pass: String, fails: &[String]| {
        if fails.is_empty() {
            o.push_str(&format!("\nPASS ({what}): {pass}\n"));
        } else {
            failed = true;
            o.push_str(&format!("\nFAIL ({what}):\n"));
            for f in fails {
                o.push_str(&format!("- {f}\n"));
            }
        }
    };
    verdict_line(
        &mut o,
        "concurrent import",
        format!(
            "{n} nodes x {} reps (and one node alone x {}) all exited 0 printing the chain ID; layers/ held exactly the {} chain IDs, \
             tmp/ was empty, names/{tag} named the top, no node's fallback got a layer or kept staging.",
            args.reps,
            args.reps,
            chain.len()
        ),
        &conc.failures.publish,
    );
    verdict_line(
        &mut o,
        "use right after the imports",
        format!("every node mounted `{tag}` by name at once as soon as the imports had returned, and `sharedloop verify {tag}` passed."),
        &conc.failures.use_after,
    );
    verdict_line(&mut o, "cleanup", "no loop device, cluster process or directory left.".into(), &leaks);
    println!("{o}");
    drop(work);
    if failed { 1 } else { 0 }
}
