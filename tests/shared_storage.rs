//! The store on real shared storage: a GlusterFS volume served inside the
//! test's own network namespace and mounted by several FUSE clients, one
//! per "node" (see tests/common/cluster.rs).

mod common;
use common::cluster::{self, Cluster, Layout};
use common::*;

fn sl(env: &Env, args: &[&str]) -> Run {
    env.sl(args)
}

#[test]
fn harness_two_nodes_see_one_volume() {
    let c = Cluster::new("smoke", Layout::Single, &[("client.strict-locks", "on")]);
    let a = c.node("a", "");
    let b = c.node("b", "");
    assert_eq!(a.sh("hostname").stdout.trim(), "node-a");
    assert_eq!(b.sh("hostname").stdout.trim(), "node-b");
    a.sh(&format!("mkdir -p {r} && echo hello > {r}/probe", r = a.root.display())).ok();
    assert_eq!(b.sh(&format!("cat {}/probe", b.root.display())).ok().stdout.as_str(), "hello\n");
    let ta = a.sh(&format!("stat -f -c %T {}", a.root.display())).ok().stdout.clone();
    assert_eq!(ta.trim(), "fuseblk");
    let id = a.add(None, Some("app:1"), &[("f.txt", E::File("from a"))]);
    let m = b.mnt("ro");
    b.run(&["mount", "-t", "sharedloop", "app:1", m.to_str().unwrap(), "-o", &b.store_opts()]).ok();
    assert_eq!(read_in(&b, &m.join("f.txt")).as_deref(), Some("from a"));
    let ls = sl(&b, &["ls", "--json"]);
    assert!(ls.ok().stdout.contains(&id[7..]), "{}", ls.stdout);
    // Node A sees that another node holds its layer, and keeps it.
    let held = |env: &Env| -> serde_json::Value {
        let j: serde_json::Value = serde_json::from_str(&sl(env, &["ls", "--json"]).ok().stdout).unwrap();
        j["layers"][0].clone()
    };
    let la = held(&a);
    assert_eq!((la["chain_id"].as_str(), la["mounts"].as_u64(), la["held_elsewhere"].as_bool()), (Some(id.as_str()), Some(0), Some(true)));
    assert_eq!(held(&b)["held_elsewhere"], false, "B's own mount is not 'elsewhere' for B");
    let human = sl(&a, &["ls"]).ok().stdout.clone();
    assert!(human.lines().any(|l| l.starts_with(&id[7..19]) && l.contains(" yes ")), "{human}");
    let st: serde_json::Value = serde_json::from_str(&sl(&a, &["status", "--json"]).ok().stdout).unwrap();
    assert_eq!(st["held_elsewhere"]["layers"], serde_json::json!([id]));
    sl(&a, &["rm", "app:1"]).fails(32, "locked by another process or node");
    let gc = sl(&a, &["rm", "--name-only", "app:1"]);
    gc.ok();
    let gc = sl(&a, &["gc", "-v", "--min-age", "0"]);
    gc.ok();
    assert!(gc.stderr.contains(&format!("layer {id} kept: it has its image")), "{}", gc.stderr);
    assert!(gc.stderr.contains("locked by another process or node"), "{}", gc.stderr);
    assert_eq!(entries(&a, &a.root.join("layers")), vec![id[7..].to_string()]);
    b.run(&["umount", m.to_str().unwrap()]).ok();
    assert_eq!(held(&a)["held_elsewhere"], false);
    sl(&a, &["gc", "--min-age", "0"]).ok();
    assert_eq!(entries(&a, &a.root.join("layers")), Vec::<String>::new());
    b.assert_clean();
    a.assert_clean();
    std::fs::remove_file(a.view(&a.root.join("probe"))).unwrap();
}

fn mount(env: &Env, src: &str, target: &std::path::Path, extra: &str) -> Run {
    let o = if extra.is_empty() { env.store_opts() } else { format!("{},{extra}", env.store_opts()) };
    env.run(&["mount", "-t", "sharedloop", src, target.to_str().unwrap(), "-o", &o])
}

fn umount(env: &Env, target: &std::path::Path) {
    env.run(&["umount", target.to_str().unwrap()]).ok();
}

/// The MMP block of an image on the node's view of the store.
fn mmp_of(env: &Env, img: &std::path::Path) -> Option<sharedloop::upper::mmp::MmpBlock> {
    sharedloop::upper::mmp::read(std::fs::File::open(env.view(img)).ok()?)
}

fn fsck_clean(env: &Env, img: &std::path::Path) {
    let r = env.run(&["e2fsck", "-fn", img.to_str().unwrap()]);
    assert_eq!(r.code, 0, "e2fsck -fn {}: {}{}", img.display(), r.stdout, r.stderr);
}

/// Finding 1: new named and path uppers on a FUSE store (rename flags
/// refused with EINVAL), used from another node afterwards; created with
/// multi-mount protection because the store is shared.
#[test]
fn uppers_created_on_the_shared_store() {
    let c = Cluster::new("uppers", Layout::Single, &[("client.strict-locks", "on")]);
    let a = c.node("a", "");
    let b = c.node("b", "");
    a.add(None, Some("app:1"), &[("f.txt", E::File("base"))]);
    let m = a.mnt("m");
    mount(&a, "app:1", &m, "upper=ua,upper_size=64M").ok();
    a.sh(&format!("echo from-a > {}/new.txt", m.display())).ok();
    umount(&a, &m);
    let named = a.root.join("uppers/ua.img");
    let paths = a.dir.join("store/paths");
    a.sh(&format!("mkdir -p {}", paths.display())).ok();
    let path_upper = paths.join("p.img");
    mount(&a, "app:1", &m, &format!("upper={},upper_size=64M", path_upper.display())).ok();
    a.sh(&format!("echo path > {}/p.txt", m.display())).ok();
    umount(&a, &m);
    for img in [&named, &path_upper] {
        let mmp = mmp_of(&a, img).unwrap_or_else(|| panic!("{}: no multi-mount protection", img.display()));
        assert_eq!(mmp.state(), sharedloop::upper::mmp::MmpState::Clean, "{}", img.display());
    }
    // Only the images themselves: no temporary left beside them.
    let left: Vec<String> = std::fs::read_dir(a.view(&a.root.join("uppers")))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, vec!["ua.img".to_string()]);
    // Node B: the same uppers, with what A wrote.
    let mb = b.mnt("m");
    mount(&b, "app:1", &mb, "upper=ua").ok();
    assert_eq!(read_in(&b, &mb.join("new.txt")).as_deref(), Some("from-a\n"));
    umount(&b, &mb);
    let bp = b.dir.join("store/paths/p.img");
    mount(&b, "app:1", &mb, &format!("upper={}", bp.display())).ok();
    assert_eq!(read_in(&b, &mb.join("p.txt")).as_deref(), Some("path\n"));
    umount(&b, &mb);
    // upper_mmp=off on shared storage: no MMP.
    mount(&a, "app:1", &m, "upper=plain,upper_size=64M,upper_mmp=off").ok();
    umount(&a, &m);
    assert_eq!(mmp_of(&a, &a.root.join("uppers/plain.img")), None);
    fsck_clean(&a, &named);
    a.assert_clean();
    b.assert_clean();
}

/// A cluster with nodes A and B, the image app:1 (one layer, with a
/// 1 MiB file never read yet) added on A, and A mounting it at its `m`
/// with the persistent upper `shared` on the volume.
fn a_holds_the_upper(name: &str, layout: Layout, options: &[(&str, &str)]) -> (Cluster, Env, Env, std::path::PathBuf) {
    let c = Cluster::new(name, layout, options);
    let a = c.node("a", "");
    let b = c.node("b", "");
    let big = "x".repeat(1 << 20);
    a.add(None, Some("app:1"), &[("f.txt", E::File("base")), ("big.bin", E::File(&big))]);
    let ma = a.mnt("m");
    mount(&a, "app:1", &ma, "upper=shared,upper_size=64M").ok();
    (c, a, b, ma)
}

/// Finding 3: node A holds an upper; a volume restart drops every lock on
/// the bricks (client.strict-locks off, GlusterFS's default), A's client
/// reconnects and A goes on writing. Node B must still be refused: the
/// image's multi-mount protection sees A's kernel updating it.
#[test]
fn one_writer_through_a_volume_restart_without_strict_locks() {
    let (c, a, b, ma) = a_holds_the_upper("restart", Layout::Single, &[]);
    a.sh(&format!("echo before > {}/a.txt && sync -f {0}", ma.display())).ok();
    let mb = b.mnt("m");
    // The lock refuses B at once while the lock service works.
    mount(&b, "app:1", &mb, "upper=shared").fails(32, "already mounted read-write");
    // B's status names the upper another node holds, and the node its
    // multi-mount protection block names (the kernel's own hostname).
    let st: serde_json::Value = serde_json::from_str(&sl(&b, &["status", "--json"]).ok().stdout).unwrap();
    let ups = st["held_elsewhere"]["uppers"].as_array().unwrap().clone();
    assert_eq!(ups.len(), 1, "{st}");
    assert_eq!(ups[0]["image"], b.root.join("uppers/shared.img").to_str().unwrap());
    assert_eq!(ups[0]["node"], rustix::system::uname().nodename().to_str().unwrap());
    c.restart_volume(&[&a, &b]);
    a.sh(&format!("echo after > {}/a2.txt && sync -f {0}", ma.display())).ok();
    let r = mount(&b, "app:1", &mb, "upper=shared");
    // Refused by the kernel's multi-mount protection: the lock is gone
    // (with upper_mmp=off B got the upper here).
    r.fails(32, "already mounted read-write on another node: ext4 multi-mount protection refused it");
    assert!(b.overlay_at(&mb).is_none());
    a.sh(&format!("echo still > {}/a3.txt && sync -f {0}", ma.display())).ok();
    umount(&a, &ma);
    // Now B gets it, with everything A wrote.
    mount(&b, "app:1", &mb, "upper=shared").ok();
    for (f, want) in [("a.txt", "before\n"), ("a2.txt", "after\n"), ("a3.txt", "still\n")] {
        assert_eq!(read_in(&b, &mb.join(f)).as_deref(), Some(want), "{f}");
    }
    umount(&b, &mb);
    fsck_clean(&a, &a.root.join("uppers/shared.img"));
    a.assert_clean();
    b.assert_clean();
}

/// With client.strict-locks on, a volume restart fences node A (its
/// locked file descriptions fail from then on) and node B may take the
/// upper: after multi-mount protection has waited out A's silent kernel.
/// A's unmount is still clean, and the image is consistent.
#[test]
fn strict_locks_fence_the_old_writer() {
    let (c, a, b, ma) = a_holds_the_upper("fence", Layout::Single, &[("client.strict-locks", "on")]);
    a.sh(&format!("echo before > {}/a.txt && sync -f {0}", ma.display())).ok();
    c.restart_volume(&[&a, &b]);
    // A is fenced: its writes no longer reach the store.
    let w = a.sh(&format!("echo after > {}/a2.txt && sync -f {0}", ma.display()));
    assert_ne!(w.code, 0, "a fenced writer's sync must fail: {w:?}");
    let mb = b.mnt("m");
    let t = std::time::Instant::now();
    mount(&b, "app:1", &mb, "upper=shared").ok();
    eprintln!("node B mounted the fenced upper after {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(read_in(&b, &mb.join("a.txt")).as_deref(), Some("before\n"));
    b.sh(&format!("echo from-b > {}/b.txt && sync -f {0}", mb.display())).ok();
    umount(&a, &ma);
    umount(&b, &mb);
    fsck_clean(&b, &b.root.join("uppers/shared.img"));
    a.assert_clean();
    b.assert_clean();
}

/// A node whose FUSE client dies: its mount gives EIO instead of hanging,
/// its upper's lock goes with the client, another node takes the upper,
/// and the dead node's unmount leaves no loop device.
#[test]
fn killed_client_gives_eio_and_releases_the_upper() {
    let (c, a, b, ma) = a_holds_the_upper("killed", Layout::Replica2, &[("client.strict-locks", "on")]);
    assert!(!a.my_loops().is_empty());
    c.kill_client(&a);
    // Never read before: the layer's pages must come from the dead store.
    let t = std::time::Instant::now();
    let r = a.run(&["timeout", "60", "cat", ma.join("big.bin").to_str().unwrap()]);
    assert_ne!(r.code, 0);
    assert_ne!(r.code, 124, "read hung on a dead client");
    assert!(r.stderr.contains("Input/output error") || r.stderr.contains("Transport endpoint"), "{}", r.stderr);
    assert!(t.elapsed() < std::time::Duration::from_secs(30));
    let mb = b.mnt("m");
    mount(&b, "app:1", &mb, "upper=shared").ok();
    assert_eq!(read_in(&b, &mb.join("f.txt")).as_deref(), Some("base"));
    umount(&b, &mb);
    // The dead node's umount: every loop device goes.
    let r = a.run(&["umount", ma.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(a.overlay_at(&ma).is_none());
    assert!(wait_no_loops(&a.dir, std::time::Duration::from_secs(20)), "loops left: {:?}", a.my_loops());
    b.assert_clean();
}

// ================================================================ imports

/// A three-layer OCI image built with umoci (in the cluster's directory,
/// which every node sees): `oci:DIR/L:v1`.
fn umoci_image(dir: &std::path::Path) -> String {
    let script = r#"set -eu
umoci init --layout L
umoci new --image L:v1
umoci unpack --image L:v1 B >/dev/null
r=B/rootfs
mkdir -p $r/etc $r/data
printf 'one\n' > $r/etc/one; head -c 2000000 /dev/urandom > $r/data/big1
umoci repack --refresh-bundle --image L:v1 B
printf 'two\n' > $r/etc/two; ln $r/etc/one $r/data/one-link; for i in $(seq 1 200); do printf "$i" > $r/data/f$i; done
umoci repack --refresh-bundle --image L:v1 B
rm $r/etc/one; printf 'three\n' > $r/etc/three; head -c 1000000 /dev/urandom > $r/data/big3
umoci repack --image L:v1 B
rm -rf B
"#;
    std::fs::create_dir_all(dir).unwrap();
    let o = std::process::Command::new("sh").arg("-c").arg(script).current_dir(dir).output().unwrap();
    assert!(o.status.success(), "umoci: {}", String::from_utf8_lossy(&o.stderr));
    format!("oci:{}:v1", dir.join("L").display())
}

fn import_args(env: &Env, root: &std::path::Path, source: &str) -> Vec<String> {
    vec![
        BIN.into(),
        "import".into(),
        source.into(),
        "-q".into(),
        "--loopback-root".into(),
        root.to_string_lossy().into(),
        "--loopback-fallback".into(),
        env.fallback.to_string_lossy().into(),
    ]
}

fn run_args(env: &Env, a: &[String]) -> Run {
    env.run(&a.iter().map(String::as_str).collect::<Vec<_>>())
}

fn entries(env: &Env, dir: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(env.view(dir))
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

/// The process `sharedloop` below a spawned command (nsenter forks it).
fn sharedloop_pid(k: &std::process::Child) -> u32 {
    descendant_running(k.id(), "sharedloop").expect("sharedloop process")
}

fn stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('T')))
}

/// `sharedloop import` on `env` started with the failpoint `stop:STEP`,
/// returned once it has stopped there: the command (nsenter), its stderr
/// and the pid of the stopped sharedloop process.
fn spawn_stopped_import(
    env: &Env,
    src: &str,
    step: &str,
) -> (std::process::Child, std::io::BufReader<std::process::ChildStderr>, u32) {
    use std::io::BufRead;
    let mut cmd = env.command(&import_args(env, &env.root, src).iter().map(String::as_str).collect::<Vec<_>>());
    cmd.env("SHAREDLOOP_FAILPOINT", format!("stop:{step}"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut k = cmd.spawn().unwrap();
    let mut err = std::io::BufReader::new(k.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("stopped at") {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "import ended before its failpoint");
    }
    let pid = sharedloop_pid(&k);
    let t = std::time::Instant::now();
    while !stopped(pid) {
        assert!(t.elapsed() < std::time::Duration::from_secs(10), "import did not stop");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    (k, err, pid)
}

/// Finding 2: node B has its first layer built and is about to publish it
/// when node A publishes the whole image; B's rename meets A's layer
/// directory (GlusterFS: ESTALE, not EEXIST). B keeps A's copy and ends
/// well. Then three nodes import another image into one store at once.
#[test]
fn nodes_importing_one_image_at_once_publish_one_copy() {
    let c = Cluster::new("imports", Layout::Replica2, &[("client.strict-locks", "on")]);
    let a = c.node("a", "");
    let b = c.node("b", "");
    let src = umoci_image(&c.dir.join("image"));
    let (k, mut err, pid) = spawn_stopped_import(&b, &src, "import-publish@0");
    let ra = run_args(&a, &import_args(&a, &a.root, &src));
    let chain = ra.ok().stdout.trim().to_string();
    let layers = entries(&a, &a.root.join("layers"));
    assert_eq!(layers.len(), 3, "{layers:?}");
    // nsenter (which forked for the PID namespace) stops itself when its
    // child stops, and passes SIGCONT on to it.
    for p in [k.id(), pid] {
        let _ = rustix::process::kill_process(rustix::process::Pid::from_raw(p as i32).unwrap(), rustix::process::Signal::CONT);
    }
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let o = k.wait_with_output().unwrap();
    assert!(o.status.success(), "node B: {rest}");
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), chain);
    assert_eq!(entries(&a, &a.root.join("layers")), layers, "one copy of each layer");
    assert_eq!(entries(&a, &a.root.join("names")), vec!["v1".to_string()]);
    // Three nodes at once, into a fresh store on the volume.
    let cn = c.node("c", "");
    let nodes = [&a, &b, &cn];
    let kids: Vec<std::process::Child> = nodes
        .iter()
        .map(|n| {
            let root2 = n.dir.join("store/root2");
            let mut c = n.command(&import_args(n, &root2, &src).iter().map(String::as_str).collect::<Vec<_>>());
            c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
            c.spawn().unwrap()
        })
        .collect();
    for (i, k) in kids.into_iter().enumerate() {
        let o = k.wait_with_output().unwrap();
        assert!(o.status.success(), "node {i}: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), chain);
    }
    let root2 = |n: &Env| n.dir.join("store/root2");
    assert_eq!(entries(&a, &root2(&a).join("layers")), layers);
    assert_eq!(entries(&a, &root2(&a).join("tmp")), Vec::<String>::new());
    // Every node mounts it and verifies the store at once: the name each
    // import wrote is read as the server has it (an import that finds the
    // name already right leaves it alone).
    for n in nodes {
        let v = n.run(&[BIN, "verify", "--loopback-root", root2(n).to_str().unwrap(), "--loopback-fallback", n.fallback.to_str().unwrap()]);
        assert_eq!(v.code, 0, "verify on {}: {v:?}", n.dir.display());
    }
    for n in nodes {
        let m = n.mnt("m");
        let o = format!("loopback_root={},loopback_fallback={}", root2(n).display(), n.fallback.display());
        n.run(&["mount", "-t", "sharedloop", "v1", m.to_str().unwrap(), "-o", &o]).ok();
        assert_eq!(read_in(n, &m.join("etc/three")).as_deref(), Some("three\n"));
        assert_eq!(read_in(n, &m.join("etc/one")), None);
        umount(n, &m);
    }
    for n in nodes {
        n.assert_clean();
    }
}

/// An import killed with SIGKILL on one node while another node imports
/// the same image: the other finishes; what the dead one left in the
/// shared store is kept by the other node's gc (another host's, and says
/// so) and removed by its own node's gc.
#[test]
fn killed_importer_while_another_node_finishes() {
    let c = Cluster::new("killimport", Layout::Single, &[("client.strict-locks", "on")]);
    let a = c.node("a", "");
    let b = c.node("b", "");
    let src = umoci_image(&c.dir.join("image"));
    let (mut k, _err, pid) = spawn_stopped_import(&a, &src, "import-build@1");
    rustix::process::kill_process(rustix::process::Pid::from_raw(pid as i32).unwrap(), rustix::process::Signal::KILL).unwrap();
    // nsenter stopped itself with its child: let it go on to reap it.
    let _ = rustix::process::kill_process(rustix::process::Pid::from_raw(k.id() as i32).unwrap(), rustix::process::Signal::CONT);
    let _ = k.wait();
    let left = entries(&a, &a.root.join("tmp"));
    assert!(!left.is_empty(), "the killed import left nothing in the shared tmp/");
    assert!(left.iter().all(|e| e.contains(".node-a.")), "{left:?}");
    let chain = run_args(&b, &import_args(&b, &b.root, &src)).ok().stdout.trim().to_string();
    assert!(chain.starts_with("sha256:"));
    // B's gc keeps A's leftovers and says why.
    let gc = sl(&b, &["gc", "-v"]);
    gc.ok();
    assert_eq!(entries(&b, &b.root.join("tmp")), left);
    for e in &left {
        assert!(gc.stderr.contains(e.as_str()), "gc -v does not say why it keeps {e}: {}", gc.stderr);
    }
    assert!(gc.stderr.contains("node-a"), "{}", gc.stderr);
    // A's own gc knows the process is gone.
    sl(&a, &["gc"]).ok();
    assert_eq!(entries(&a, &a.root.join("tmp")), Vec::<String>::new());
    let m = b.mnt("m");
    mount(&b, "v1", &m, "").ok();
    assert_eq!(read_in(&b, &m.join("etc/two")).as_deref(), Some("two\n"));
    umount(&b, &m);
    a.assert_clean();
    b.assert_clean();
}

/// Finding 7: node A re-points a name; node B, which has just read it,
/// mounts what the name points to now, not what its client cached.
#[test]
fn repointed_name_is_seen_at_once_by_another_node() {
    let c = Cluster::new("names", Layout::Single, &[("client.strict-locks", "on")]);
    let a = c.node("a", "");
    let b = c.node("b", "");
    a.add(None, Some("app:latest"), &[("v.txt", E::File("one"))]);
    a.add(None, None, &[("v.txt", E::File("two"))]);
    let m = b.mnt("m");
    let mut stale = vec![];
    for round in 0..4 {
        let (now, next) = if round % 2 == 0 { ("one", "two") } else { ("two", "one") };
        // B reads the name (its client caches what it caches) ...
        mount(&b, "app:latest", &m, "").ok();
        umount(&b, &m);
        // ... A re-points it (add of an existing layer only names it) ...
        a.add(None, Some("app:latest"), &[("v.txt", E::File(next))]);
        // ... and B mounts it again at once.
        mount(&b, "app:latest", &m, "").ok();
        let got = read_in(&b, &m.join("v.txt")).unwrap();
        umount(&b, &m);
        if got != next {
            stale.push(format!("round {round}: wanted {next}, mounted {got} (was {now})"));
        }
    }
    assert!(stale.is_empty(), "node B mounted what the name pointed to before: {stale:#?}");
    a.assert_clean();
    b.assert_clean();
}

/// A shared store turned read-only (here: the volume's read-only option):
/// new layers and uppers go to each node's fallback store, layers already
/// on the volume are still mounted from it, and a node's mount shows both.
#[test]
fn read_only_shared_store_falls_back_per_layer() {
    let c = Cluster::new("readonly", Layout::Single, &[("client.strict-locks", "on")]);
    let a = c.node("a", "");
    let base = a.add(None, Some("base:1"), &[("base.txt", E::File("on the volume"))]);
    c.gluster(&["volume", "set", cluster::VOLUME, "features.read-only", "on"]).ok();
    let t = std::time::Instant::now();
    while a.sh(&format!("touch {}/probe", a.root.display())).code == 0 {
        a.sh(&format!("rm -f {}/probe", a.root.display()));
        assert!(t.elapsed() < std::time::Duration::from_secs(30), "volume never became read-only");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let top = a.add(Some(&base), Some("app:1"), &[("app.txt", E::File("in the fallback"))]);
    assert_eq!(entries(&a, &a.fallback.join("layers")), vec![top[7..].to_string()]);
    assert_eq!(entries(&a, &a.root.join("layers")), vec![base[7..].to_string()]);
    let m = a.mnt("m");
    mount(&a, "app:1", &m, "upper=u1,upper_size=64M").ok();
    assert_eq!(read_in(&a, &m.join("base.txt")).as_deref(), Some("on the volume"));
    assert_eq!(read_in(&a, &m.join("app.txt")).as_deref(), Some("in the fallback"));
    a.sh(&format!("echo w > {}/w.txt", m.display())).ok();
    umount(&a, &m);
    assert_eq!(entries(&a, &a.fallback.join("uppers")), vec!["u1.img".to_string()]);
    a.assert_clean();
}
