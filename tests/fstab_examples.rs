//! Every fstab.d example, mounted for real: the test's paths (stores, mount
//! point, upper image) are substituted into the example's line, the image
//! it names is put into the test's store, and `mount -T FILE TARGET` mounts
//! it inside the test's namespace. Examples without store options rely on
//! /etc/sharedloop/sharedloop.conf, as their comments say: the test gives
//! them a configuration file naming its store.

mod common;
use common::*;
use std::path::Path;

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");

/// The one entry of an example file (comments skipped).
fn example(file: &str) -> String {
    let text = std::fs::read_to_string(Path::new(MANIFEST).join("fstab.d").join(file)).unwrap();
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
    assert_eq!(lines.len(), 1, "{file}: one entry expected: {lines:?}");
    lines[0].to_string()
}

/// The example's line with the test's values in. Every replaced string must
/// be in the example (so a changed example fails here, not somewhere odd),
/// and afterwards every absolute path in the line must be the test's own.
fn substitute(env: &Env, file: &str, subst: &[(&str, String)]) -> String {
    let mut line = example(file);
    for (from, to) in subst {
        assert!(line.contains(from), "{file}: {from:?} not in the example any more: {line}");
        line = line.replace(from, to);
    }
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(f.len(), 6, "{line}");
    assert_eq!(f[2], "sharedloop");
    let mut paths = vec![f[1]];
    paths.extend(f[3].split(',').filter_map(|o| o.split_once('=')).map(|(_, v)| v).filter(|v| v.starts_with('/')));
    for p in paths {
        assert!(p.starts_with(env.dir.to_str().unwrap()), "{file}: {p} is not the test's (add a substitution): {line}");
    }
    line
}

/// Mount the line through mount(8) from an fstab file, by target.
fn mount_fstab(env: &Env, file: &str, line: &str, target: &Path) -> Run {
    let fstab = env.dir.join(format!("fstab-{file}"));
    std::fs::write(&fstab, format!("# {file} with the test's paths\n{line}\n")).unwrap();
    env.run(&["mount", "-T", fstab.to_str().unwrap(), target.to_str().unwrap()])
}

/// Defaults from a configuration file, as /etc/sharedloop/sharedloop.conf would give.
fn config_store(env: &mut Env) {
    let cfg = env.dir.join("sharedloop.conf");
    std::fs::write(&cfg, format!("loopback_root={}\nloopback_fallback={}\n", env.root.display(), env.fallback.display())).unwrap();
    env.envs.push(("SHAREDLOOP_CONFIG".into(), cfg.to_string_lossy().into()));
}

/// A two-layer image named `name`; returns the top's chain ID.
fn image(env: &Env, name: &str) -> String {
    let base = env.add(None, None, &[("etc/os-release", E::File("base\n")), ("base.txt", E::File("base\n"))]);
    env.add(Some(&base), Some(name), &[("top.txt", E::File("top\n")), ("etc/os-release", E::File("top\n"))])
}

/// The mount's per-mount (VFS) options in mountinfo.
fn vfs_opts(env: &Env, target: &Path) -> String {
    let t = target.to_str().unwrap();
    let line = env.mountinfo().into_iter().rev().find(|l| l.split(' ').nth(4) == Some(t)).unwrap_or_else(|| panic!("nothing mounted at {t}"));
    line.split(' ').nth(5).unwrap().to_string()
}

fn has_opt(opts: &str, o: &str) -> bool {
    opts.split(',').any(|x| x == o)
}

/// The merged view is the image's, and writes go (or not) to the upper.
#[track_caller]
fn assert_view(env: &Env, m: &Path) {
    assert_eq!(read_in(env, &m.join("top.txt")).as_deref(), Some("top\n"));
    assert_eq!(read_in(env, &m.join("base.txt")).as_deref(), Some("base\n"));
    assert_eq!(read_in(env, &m.join("etc/os-release")).as_deref(), Some("top\n"));
}

#[track_caller]
fn umount(env: &Env, m: &Path) {
    env.run(&["umount", m.to_str().unwrap()]).ok();
    assert!(env.overlay_at(m).is_none(), "still mounted at {}", m.display());
}

#[test]
fn shared_storage_example() {
    // Store on shared storage, read-only to this node: layers are read from
    // the root, the named upper is created in the node-local fallback.
    let file = "10-shared-storage.fstab";
    let env = Env::new("ex10");
    image(&env, "debian:12");
    let m = env.mnt("srv-containers-debian");
    let line = substitute(
        &env,
        file,
        &[
            ("/mnt/nfs/sharedloop", env.root.display().to_string()),
            ("/var/lib/sharedloop/private", env.fallback.display().to_string()),
            ("/srv/containers/debian", m.display().to_string()),
        ],
    );
    assert!(line.contains("upper=debian-node1") && line.contains("_netdev") && line.contains("nofail"), "{line}");
    let root = env.root.to_str().unwrap();
    env.sh(&format!("mount --bind {root} {root} && mount -o remount,bind,ro {root}")).ok();

    mount_fstab(&env, file, &line, &m).ok();
    let (src, sopts) = env.overlay_at(&m).expect("overlay mounted");
    assert_eq!(src, "debian:12");
    assert!(sopts.starts_with("rw,") && sopts.contains("upperdir="), "writable: {sopts}");
    assert_view(&env, &m);
    let upper = env.fallback.join("uppers/debian-node1.img");
    assert_eq!(std::fs::metadata(&upper).expect("upper in the fallback").len(), 20 << 30, "upper_size=20G");
    assert!(!env.root.join("uppers").exists());
    // mount(8) keeps the userspace options in utab, with the helper's mark.
    let utab = env.utab();
    assert!(utab.contains("OPTS=helper=sharedloop,") && utab.contains("_netdev"), "{utab}");
    env.sh(&format!("echo kept > {}/node.txt", m.display())).ok();
    umount(&env, &m);
    // The upper persists: mounted again, the write is there.
    mount_fstab(&env, file, &line, &m).ok();
    assert_eq!(read_in(&env, &m.join("node.txt")).as_deref(), Some("kept\n"));
    umount(&env, &m);
    env.run(&["umount", root]).ok();
    env.assert_clean();
}

#[test]
fn local_store_example() {
    let file = "20-local-store.fstab";
    let mut env = Env::new("ex20");
    config_store(&mut env);
    image(&env, "debian:12");
    let m = env.mnt("srv-containers-scratch");
    let line = substitute(&env, file, &[("/srv/containers/scratch", m.display().to_string())]);
    assert!(!line.contains("loopback_root"), "store from the configuration file: {line}");
    mount_fstab(&env, file, &line, &m).ok();
    let (src, sopts) = env.overlay_at(&m).expect("overlay mounted");
    assert_eq!(src, "debian:12");
    assert!(sopts.starts_with("rw,"), "{sopts}");
    assert!(has_opt(&vfs_opts(&env, &m), "nodev"), "{}", vfs_opts(&env, &m));
    assert_view(&env, &m);
    env.sh(&format!("echo scratch > {}/tmp.txt", m.display())).ok();
    umount(&env, &m);
    // tmpfs upper: thrown away, and no image was made.
    mount_fstab(&env, file, &line, &m).ok();
    assert_eq!(read_in(&env, &m.join("tmp.txt")), None);
    umount(&env, &m);
    assert!(!env.root.join("uppers").exists() && !env.fallback.join("uppers").exists());
    env.assert_clean();
}

#[test]
fn read_only_example() {
    let file = "30-read-only.fstab";
    let mut env = Env::new("ex30");
    config_store(&mut env);
    let top = image(&env, "base:1");
    let prefix = top.strip_prefix("sha256:").unwrap()[..12].to_string();
    let m = env.mnt("srv-images-base");
    let line = substitute(&env, file, &[("3f2a9c1b7d4e", prefix.clone()), ("/srv/images/base", m.display().to_string())]);
    mount_fstab(&env, file, &line, &m).ok();
    let (src, sopts) = env.overlay_at(&m).expect("overlay mounted");
    assert_eq!(src, prefix, "the prefix as written is the source umount(8) matches");
    assert!(sopts.starts_with("ro,") && !sopts.contains("upperdir"), "no upper: {sopts}");
    let vfs = vfs_opts(&env, &m);
    for o in ["ro", "nosuid", "nodev"] {
        assert!(has_opt(&vfs, o), "{o} not in {vfs}");
    }
    assert_view(&env, &m);
    let r = env.sh(&format!("echo x > {}/new.txt", m.display()));
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("Read-only file system"), "{}", r.stderr);
    umount(&env, &m);
    env.assert_clean();
}

#[test]
fn tmpfs_upper_example() {
    let file = "40-tmpfs-upper.fstab";
    let mut env = Env::new("ex40");
    config_store(&mut env);
    let top = image(&env, "library/busybox:1.36");
    let m = env.mnt("run-containers-busybox");
    let line = substitute(&env, file, &[("/run/containers/busybox", m.display().to_string())]);
    mount_fstab(&env, file, &line, &m).ok();
    let (src, sopts) = env.overlay_at(&m).expect("overlay mounted");
    assert_eq!(src, "library/busybox:1.36");
    assert!(sopts.starts_with("rw,"), "{sopts}");
    assert!(has_opt(&vfs_opts(&env, &m), "noatime"), "{}", vfs_opts(&env, &m));
    assert_view(&env, &m);
    // direct_io=off: the layer devices use buffered I/O.
    let loops = env.my_loops();
    assert!(loops.iter().any(|(_, b)| b.contains(&top[7..])), "top layer on a loop device: {loops:?}");
    for (n, _) in &loops {
        assert_eq!(std::fs::read_to_string(format!("/sys/block/loop{n}/loop/dio")).unwrap().trim(), "0", "loop{n}");
    }
    env.sh(&format!("echo w > {}/w.txt", m.display())).ok();
    umount(&env, &m);
    assert!(!env.root.join("uppers").exists());
    env.assert_clean();
}

#[test]
fn persistent_upper_example() {
    let file = "50-persistent-upper.fstab";
    let mut env = Env::new("ex50");
    config_store(&mut env);
    image(&env, "web:2");
    // As the example says: the image's directory is the admin's to make
    // (mount.sharedloop creates the image, not directories above it).
    let uppers = env.dir.join("var-lib-sharedloop/uppers");
    std::fs::create_dir_all(&uppers).unwrap();
    let img = uppers.join("web.img");
    let m = env.mnt("srv-containers-web");
    let line = substitute(
        &env,
        file,
        &[("/var/lib/sharedloop/uppers/web.img", img.display().to_string()), ("/srv/containers/web", m.display().to_string())],
    );
    mount_fstab(&env, file, &line, &m).ok();
    let (src, sopts) = env.overlay_at(&m).expect("overlay mounted");
    assert_eq!(src, "web:2");
    assert!(sopts.starts_with("rw,") && sopts.contains("upperdir="), "{sopts}");
    for o in ["metacopy=on", "redirect_dir=on"] {
        assert!(sopts.contains(o), "{o} not in {sopts}");
    }
    assert_view(&env, &m);
    // Created on first mount: 10G, reserved in full (upper_alloc=full, the
    // default), xfs.
    let md = std::fs::metadata(&img).expect("upper image created");
    assert_eq!(md.len(), 10 << 30);
    assert!(std::os::unix::fs::MetadataExt::blocks(&md) * 512 >= 10 << 30, "reserved");
    let mut magic = [0u8; 4];
    std::io::Read::read_exact(&mut std::fs::File::open(&img).unwrap(), &mut magic).unwrap();
    assert_eq!(&magic, b"XFSB");
    env.sh(&format!("echo page > {0}/index.html && rm {0}/base.txt", m.display())).ok();
    // A second read-write mount of the same upper is refused.
    let m2 = env.mnt("second");
    let opts = line.split_whitespace().nth(3).unwrap();
    env.run(&["mount", "-t", "sharedloop", "web:2", m2.to_str().unwrap(), "-o", opts]).fails(32, "already mounted read-write");
    umount(&env, &m);
    // Reused after: the writes are there.
    mount_fstab(&env, file, &line, &m).ok();
    assert_eq!(read_in(&env, &m.join("index.html")).as_deref(), Some("page\n"));
    assert_eq!(read_in(&env, &m.join("base.txt")), None);
    umount(&env, &m);
    env.assert_clean();
}
