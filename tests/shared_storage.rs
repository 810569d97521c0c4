//! The store on real shared storage: a GlusterFS volume served inside the
//! test's own network namespace and mounted by several FUSE clients, one
//! per "node" (see tests/common/cluster.rs).

mod common;
use common::cluster::{Cluster, Layout};
use common::*;

fn sl(env: &Env, args: &[&str]) -> Run {
    let (root, fb) = (env.root.to_str().unwrap().to_string(), env.fallback.to_str().unwrap().to_string());
    let mut v: Vec<&str> = vec![BIN];
    v.extend_from_slice(args);
    v.extend_from_slice(&["--loopback-root", &root, "--loopback-fallback", &fb]);
    env.run(&v)
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
    b.run(&["umount", m.to_str().unwrap()]).ok();
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
fn mmp_of(env: &Env, img: &std::path::Path) -> Option<sharedloop::mmp::MmpBlock> {
    sharedloop::mmp::read(std::fs::File::open(env.view(img)).ok()?)
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
        assert_eq!(mmp.state(), sharedloop::mmp::MmpState::Clean, "{}", img.display());
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

/// Finding 3: node A holds an upper; a volume restart drops every lock on
/// the bricks (client.strict-locks off, GlusterFS's default), A's client
/// reconnects and A goes on writing. Node B must still be refused: the
/// image's multi-mount protection sees A's kernel updating it.
#[test]
fn one_writer_through_a_volume_restart_without_strict_locks() {
    let c = Cluster::new("restart", Layout::Single, &[]);
    let a = c.node("a", "");
    let b = c.node("b", "");
    a.add(None, Some("app:1"), &[("f.txt", E::File("base"))]);
    let ma = a.mnt("m");
    mount(&a, "app:1", &ma, "upper=shared,upper_size=64M").ok();
    a.sh(&format!("echo before > {}/a.txt && sync -f {0}", ma.display())).ok();
    let mb = b.mnt("m");
    // The lock refuses B at once while the lock service works.
    mount(&b, "app:1", &mb, "upper=shared").fails(32, "already mounted read-write");
    c.restart_volume(&[&a, &b]);
    a.sh(&format!("echo after > {}/a2.txt && sync -f {0}", ma.display())).ok();
    let r = mount(&b, "app:1", &mb, "upper=shared");
    r.fails(32, "upper image");
    assert!(r.stderr.contains("already mounted read-write"), "{}", r.stderr);
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
    let c = Cluster::new("fence", Layout::Single, &[("client.strict-locks", "on")]);
    let a = c.node("a", "");
    let b = c.node("b", "");
    a.add(None, Some("app:1"), &[("f.txt", E::File("base"))]);
    let ma = a.mnt("m");
    mount(&a, "app:1", &ma, "upper=shared,upper_size=64M").ok();
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
    let c = Cluster::new("killed", Layout::Replica2, &[("client.strict-locks", "on")]);
    let a = c.node("a", "");
    let b = c.node("b", "");
    let big = "x".repeat(1 << 20);
    a.add(None, Some("app:1"), &[("f.txt", E::File("base")), ("big.bin", E::File(&big))]);
    let ma = a.mnt("m");
    mount(&a, "app:1", &ma, "upper=shared,upper_size=64M").ok();
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
