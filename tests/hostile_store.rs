//! A store someone else can write to: every file of a layer or a name
//! replaced by something it should not be. Each case must end every
//! command (mount, ls, verify) quickly with a clear message and exit
//! code, never hang or panic, and leave nothing behind. Commands run under
//! `timeout`, so a hang fails the case (exit 124) instead of the suite.

mod common;
use common::*;

use std::path::{Path, PathBuf};

/// How long any command on a damaged store may take before it counts as
/// hung: far above the second or so they take, far below the 10 minutes
/// a FIFO used to hold a mount.
const HANG: &str = "20";

/// What to do to the store for one case.
enum Damage {
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
    Directory,
    /// A symlink to a copy of the file outside the store.
    Symlink,
    /// Cut to this many bytes.
    Truncate(u64),
    /// Grown (sparse) to this many bytes.
    Huge(u64),
    /// Replaced by these bytes.
    Content(Vec<u8>),
}

fn damage(p: &Path, d: &Damage, outside: &Path) {
    let _ = std::fs::remove_file(p);
    let _ = std::fs::remove_dir_all(p);
    let sh = |cmd: &str| {
        let st = std::process::Command::new("sh").args(["-c", cmd]).status().unwrap();
        assert!(st.success(), "{cmd}");
    };
    match d {
        Damage::Fifo => sh(&format!("mkfifo '{}'", p.display())),
        Damage::Socket => {
            // Bound and closed: the socket file stays, nobody listens.
            // Bound at a short path (sun_path is 108 bytes) and moved.
            let short = std::env::temp_dir().join(format!("sl-sock-{}", std::process::id()));
            drop(std::os::unix::net::UnixListener::bind(&short).unwrap());
            std::fs::rename(&short, p).unwrap();
        }
        Damage::CharDevice => sh(&format!("mknod '{}' c 1 3", p.display())),
        Damage::BlockDevice => sh(&format!("mknod '{}' b 7 0", p.display())),
        Damage::Directory => std::fs::create_dir(p).unwrap(),
        Damage::Symlink => std::os::unix::fs::symlink(outside, p).unwrap(),
        Damage::Truncate(n) | Damage::Huge(n) => {
            std::fs::copy(outside, p).unwrap();
            std::fs::OpenOptions::new().write(true).open(p).unwrap().set_len(*n).unwrap();
        }
        Damage::Content(b) => std::fs::write(p, b).unwrap(),
    }
}

/// Put the original back (saved as `outside`).
fn restore(p: &Path, outside: &Path) {
    let _ = std::fs::remove_file(p);
    let _ = std::fs::remove_dir_all(p);
    std::fs::copy(outside, p).unwrap();
}

fn timed(env: &Env, args: &[&str]) -> Run {
    let mut v = vec!["timeout", "-s", "KILL", HANG];
    v.extend_from_slice(args);
    env.run(&v)
}

#[test]
fn every_kind_of_damage_is_refused_quickly_and_cleanly() {
    // ext4 layers: one kind of damage is an erofs image in an ext4 layer's place.
    let mut env = Env::new("hostile");
    env.pin_layer_fstype("ext4");
    let bottom = env.add(None, None, &[("a.txt", E::File("a\n"))]);
    let top = env.add(Some(&bottom), Some("evil:top"), &[("b.txt", E::File("b\n"))]);
    let m = env.mnt("m");
    let img = layer_dir(&env.root, &top).join("layer.img");
    let meta = layer_dir(&env.root, &top).join("meta.json");
    let bottom_meta = layer_dir(&env.root, &bottom).join("meta.json");
    let name = env.root.join("names/evil:top");
    assert!(name.is_file(), "name record at {}", name.display());
    let size = std::fs::metadata(&img).unwrap().len();
    // Metadata that makes the bottom layer its own grandchild: the chain
    // ID it claims is the top's.
    let cyclic = std::fs::read_to_string(&bottom_meta).unwrap().replacen(
        "\"parent\": null",
        &format!("\"parent\": \"{top}\""),
        1,
    );
    assert_ne!(cyclic, std::fs::read_to_string(&bottom_meta).unwrap(), "metadata has no null parent to replace");

    // An erofs image of another tree, as is and padded to the ext4 image's size.
    let erofs = env.add_with(None, None, &[("z.txt", E::File("z\n"))], &["--fstype", "erofs"]);
    let erofs_img = std::fs::read(layer_dir(&env.root, &erofs).join("layer.img")).unwrap();
    assert!(erofs_img.len() as u64 != size);
    let mut padded = erofs_img.clone();
    padded.resize(size as usize, 0);

    let not_regular = "not a regular file: refusing to open it";
    let cases: Vec<(&str, &PathBuf, Damage, Vec<String>)> = vec![
        ("image FIFO", &img, Damage::Fifo, vec![format!("{}: a FIFO, {not_regular}", img.display())]),
        ("image socket", &img, Damage::Socket, vec![format!("{}: a socket, {not_regular}", img.display())]),
        ("image char device", &img, Damage::CharDevice, vec![format!("{}: a character device, {not_regular}", img.display())]),
        ("image block device", &img, Damage::BlockDevice, vec![format!("{}: a block device, {not_regular}", img.display())]),
        ("image directory", &img, Damage::Directory, vec![format!("{}: a directory, {not_regular}", img.display())]),
        ("image symlink", &img, Damage::Symlink, vec![format!("refusing symlink or path outside the store: {}", img.display())]),
        (
            "image truncated",
            &img,
            Damage::Truncate(size / 2),
            vec![format!("{}: {} bytes, its metadata says {size}", img.display(), size / 2)],
        ),
        (
            "image grown",
            &img,
            Damage::Huge(size + 4096),
            vec![format!("{}: {} bytes, its metadata says {size}", img.display(), size + 4096)],
        ),
        (
            "erofs image in an ext4 layer",
            &img,
            Damage::Content(erofs_img.clone()),
            vec![format!("{}: {} bytes, its metadata says {size}", img.display(), erofs_img.len())],
        ),
        (
            "erofs image of the right size in an ext4 layer",
            &img,
            Damage::Content(padded),
            vec![format!("{}: the image holds erofs, not ext4, its metadata says ext4", img.display())],
        ),
        ("metadata FIFO", &meta, Damage::Fifo, vec![format!("{}: a FIFO, {not_regular}", meta.display())]),
        ("metadata socket", &meta, Damage::Socket, vec![format!("{}: a socket, {not_regular}", meta.display())]),
        ("metadata directory", &meta, Damage::Directory, vec![format!("{}: a directory, {not_regular}", meta.display())]),
        ("metadata truncated", &meta, Damage::Truncate(40), vec![format!("{}: corrupt metadata", meta.display())]),
        // 16 GiB, sparse: read no further than metadata can be long.
        ("metadata huge", &meta, Damage::Huge(1 << 34), vec![format!("{}: corrupt metadata", meta.display())]),
        ("metadata not text", &meta, Damage::Content(b"\xff\xfe{}".to_vec()), vec![format!("{}: not UTF-8 text", meta.display())]),
        ("metadata cycle", &bottom_meta, Damage::Content(cyclic.into_bytes()), vec![format!("layer {bottom}")]),
        ("name FIFO", &name, Damage::Fifo, vec![format!("{}: a FIFO, {not_regular}", name.display())]),
        ("name socket", &name, Damage::Socket, vec![format!("{}: a socket, {not_regular}", name.display())]),
        ("name char device", &name, Damage::CharDevice, vec![format!("{}: a character device, {not_regular}", name.display())]),
        ("name huge", &name, Damage::Huge(1 << 34), vec![format!("name evil:top: {}: corrupt name record", name.display())]),
        ("name symlink", &name, Damage::Symlink, vec![format!("refusing symlink or path outside the store: {}", name.display())]),
    ];
    let save = env.dir.join("saved");
    std::fs::create_dir_all(&save).unwrap();
    for (what, path, d, frags) in &cases {
        let outside = save.join(path.file_name().unwrap());
        std::fs::copy(path, &outside).unwrap();
        damage(path, d, &outside);
        let frags: Vec<&str> = frags.iter().map(String::as_str).collect();
        // By name and by ID (the name case only by name: the ID does not use it).
        let sources: &[&str] = if **path == name { &["evil:top"] } else { &["evil:top", &top] };
        for src in sources {
            let o = env.store_opts();
            let r = timed(&env, &["mount.sharedloop", src, s(&m), "-o", &o]);
            check_failed(&env, &r, 32, &frags, &m, &format!("{what}, mount {src}"));
        }
        // The store commands end too, and verify reports the damage.
        let root = env.root.to_str().unwrap();
        let r = timed(&env, &[BIN, "verify", "--loopback-root", root]);
        assert_eq!(r.code, 32, "{what}: verify: {r:?}");
        assert!(r.stdout.contains("FAIL "), "{what}: verify names no failure: {}", r.stdout);
        assert!(!r.stderr.contains("panicked"), "{what}: {}", r.stderr);
        // ls lists what it can and warns of the damage, naming the place.
        let r = timed(&env, &[BIN, "ls", "--loopback-root", root]);
        assert_eq!(r.code, 0, "{what}: ls: {r:?}");
        let place = if path.starts_with(env.root.join("names")) { path.to_path_buf() } else { path.parent().unwrap().to_path_buf() };
        // An image of the wrong size or format is verify's to find: ls reads
        // metadata and names, not images.
        let ls_sees = !(**path == img && matches!(d, Damage::Truncate(_) | Damage::Huge(_) | Damage::Content(_)));
        assert!(!ls_sees ||r.stderr.contains("warning") && r.stderr.contains(place.to_str().unwrap()) || r.stderr.contains(&format!("{}", path.display())), "{what}: ls does not name {}: {}", place.display(), r.stderr);
        restore(path, &outside);
        std::fs::remove_file(&outside).unwrap();
    }
    // Restored, the image mounts again.
    let o = env.store_opts();
    env.run(&["mount.sharedloop", "evil:top", s(&m), "-o", &o]).ok();
    assert_eq!(std::fs::read_to_string(env.view(&m.join("a.txt"))).unwrap(), "a\n");
    env.run(&["umount", s(&m)]).ok();
    std::fs::remove_dir_all(&save).unwrap();
    env.assert_clean();
}

#[test]
fn a_missing_store_is_not_a_missing_image() {
    let env = Env::new("nostore");
    let m = env.mnt("m");
    let gone = env.dir.join("nonexistent");
    let (g, fb) = (gone.to_str().unwrap(), env.fallback.to_str().unwrap());
    assert!(!env.fallback.exists());
    // Neither store directory: the message says so, with both errnos.
    let want = format!("no store: {g}: No such file or directory; fallback {fb}: No such file or directory");
    let o = format!("loopback_root={g},loopback_fallback={fb}");
    let r = env.run(&["mount.sharedloop", "app:1", s(&m), "-o", &o]);
    check_failed(&env, &r, 32, &[&want], &m, "no store");
    for cmd in [&["ls"][..], &["gc", "--dry-run"], &["verify"], &["rm", "app:1"]] {
        let mut v = vec![BIN];
        v.extend_from_slice(cmd);
        v.extend_from_slice(&["--loopback-root", g, "--loopback-fallback", fb]);
        let r = env.run(&v);
        assert_ne!(r.code, 0, "{cmd:?} on a missing store: {r:?}");
        assert!(r.stderr.contains(&want), "{cmd:?}: {}", r.stderr);
        assert!(!r.stdout.contains("0 checked, 0 failed"), "{cmd:?}: {}", r.stdout);
    }
    // A root that is not there beside a fallback that is: the lookup's
    // message says the root is missing, and verify fails on it.
    std::fs::create_dir_all(env.fallback.join("names")).unwrap();
    let r = env.run(&["mount.sharedloop", "app:1", s(&m), "-o", &o]);
    check_failed(
        &env,
        &r,
        32,
        &[&format!("image app:1: no such name in {g} nor {fb} (store directory {g}: No such file or directory)")],
        &m,
        "root missing",
    );
    let r = env.run(&[BIN, "verify", "--loopback-root", g, "--loopback-fallback", fb]);
    assert_eq!(r.code, 32, "{r:?}");
    assert!(r.stdout.contains(&format!("FAIL  store {g}: cannot open it: No such file or directory")), "{}", r.stdout);
    assert!(r.stdout.contains("verify: 1 checked, 1 failed"), "{}", r.stdout);
    let r = env.run(&[BIN, "ls", "--loopback-root", g, "--loopback-fallback", fb]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.contains(&format!("root store {g}: No such file or directory; listing the fallback only")), "{}", r.stderr);
    // A file where the store should be.
    std::fs::write(&gone, "").unwrap();
    let r = env.run(&["mount.sharedloop", "app:1", s(&m), "-o", &o]);
    check_failed(&env, &r, 32, &[&format!("{g}: Not a directory")], &m, "store is a file");
    std::fs::remove_file(&gone).unwrap();
    std::fs::remove_dir_all(&env.fallback).unwrap();
    env.assert_clean();
}
