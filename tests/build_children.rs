//! A killed sharedloop takes the commands it runs down with it (issue 7,
//! item 5): after a SIGKILL of `sharedloop add` or of mount.sharedloop
//! creating an upper, no mkfs, no xfs copy (unshare, sh, mount, cp) keeps
//! writing into the store, where a `gc` would delete under it.
//!
//! Each case starts the command, waits until the external command it names
//! runs below it, stops that command (SIGSTOP: so how fast this machine
//! is cannot make it finish by itself and pass the test for the wrong
//! reason), records every descendant, SIGKILLs the sharedloop process and
//! expects every recorded descendant gone within a few seconds. Only pids
//! recorded as descendants of the process the test started are ever
//! signalled.

mod common;
use common::*;

use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

/// A process, told apart from a later one with the same pid by its start
/// time (field 22 of /proc/PID/stat).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Proc {
    pid: u32,
    start: u64,
}

/// (state, start time) of `pid`.
fn stat(pid: u32) -> Option<(char, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm (field 2) may hold spaces and parentheses: fields 3.. follow the last ')'.
    let rest: Vec<&str> = s[s.rfind(')')? + 1..].split_whitespace().collect();
    let state = rest.first()?.chars().next()?;
    let start = rest.get(22 - 3)?.parse().ok()?;
    Some((state, start))
}

fn proc_of(pid: u32) -> Option<Proc> {
    stat(pid).map(|(_, start)| Proc { pid, start })
}

/// Still running (a zombie runs nothing and writes nothing).
fn alive(p: Proc) -> bool {
    stat(p.pid).is_some_and(|(state, start)| start == p.start && state != 'Z' && state != 'X')
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).map(|s| s.trim().to_string()).unwrap_or_default()
}

fn argv0(pid: u32) -> String {
    let b = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(b.split(|&c| c == 0).next().unwrap_or_default()).into_owned()
}

/// Every process below `pid` (not `pid` itself).
fn descendants(pid: u32) -> Vec<u32> {
    let mut out = vec![];
    let mut stack = children_of(pid);
    while let Some(p) = stack.pop() {
        out.push(p);
        stack.extend(children_of(p));
    }
    out
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) with a pid this test recorded as its own descendant.
    unsafe { libc::kill(pid as i32, sig) };
}

/// The sharedloop process at or below the started `nsenter` (which execs
/// it, or may fork it).
fn sharedloop_below(root: u32) -> Option<u32> {
    std::iter::once(root).chain(descendants(root)).find(|&p| argv0(p).ends_with("sharedloop"))
}

/// A tree of `files` files of `size` bytes of incompressible data (mkfs
/// skips zero blocks; mkfs.erofs would compress repeats away).
fn big_tree(dir: &Path, files: usize, size: usize) {
    std::fs::create_dir_all(dir).unwrap();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..files {
        let mut data = Vec::with_capacity(size);
        while data.len() < size {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            data.extend_from_slice(&x.to_le_bytes());
        }
        let sub = dir.join(format!("d{}", i % 16));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("f{i}")), &data).unwrap();
    }
}

/// How long the build may take to reach the step the test waits for: a
/// bound for a hang, not a timing. Under qemu TCG (the 6.1 kernel round)
/// hashing and walking the tree before mkfs starts took over 120 s.
const START_WITHIN: Duration = Duration::from_secs(900);

/// Start `argv` in the test's namespace, wait until a process whose comm
/// is `want` runs below sharedloop, stop it, SIGKILL sharedloop, and check
/// that every descendant recorded then is gone within a few seconds.
fn kill_while_running(env: &Env, argv: &[&str], want: &str, ctx: &str) {
    signal_while_running(env, argv, want, ctx, libc::SIGKILL);
}

/// The same with `sig`; for SIGTERM the helper itself must end the child
/// and exit 8.
fn signal_while_running(env: &Env, argv: &[&str], want: &str, ctx: &str, sig: i32) {
    let mut child: Child = env.command(argv).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    let deadline = Instant::now() + START_WITHIN;
    let (helper, recorded) = loop {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("{ctx}: finished ({st}) before {want} was seen running below it");
        }
        assert!(Instant::now() < deadline, "{ctx}: {want} never ran");
        if let Some(h) = sharedloop_below(child.id())
            && let Some(p) = descendants(h).into_iter().find(|&p| comm(p) == want)
        {
            signal(p, libc::SIGSTOP);
            // Everything below sharedloop now, the stopped command included.
            let recorded: Vec<(Proc, String)> =
                descendants(h).into_iter().filter_map(|p| proc_of(p).map(|q| (q, comm(p)))).collect();
            break (h, recorded);
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    eprintln!("{ctx}: killing sharedloop {helper}; below it: {recorded:?}");
    let helper_proc = proc_of(helper).expect("sharedloop still running");
    signal(helper, sig);
    let st = child.wait().unwrap();
    assert!(!alive(helper_proc), "{ctx}: sharedloop survived signal {sig} ({st})");
    if sig == libc::SIGTERM {
        assert_eq!(st.code(), Some(8), "{ctx}: SIGTERM is exit 8");
    }

    let gone = Instant::now() + Duration::from_secs(5);
    while recorded.iter().any(|(p, _)| alive(*p)) && Instant::now() < gone {
        std::thread::sleep(Duration::from_millis(10));
    }
    let left: Vec<&(Proc, String)> = recorded.iter().filter(|(p, _)| alive(*p)).collect();
    if !left.is_empty() {
        // Take down what we started before failing (recorded pids only).
        for (p, _) in &left {
            if alive(*p) {
                signal(p.pid, libc::SIGKILL);
            }
        }
        let t = Instant::now();
        while left.iter().any(|(p, _)| alive(*p)) && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("{ctx}: still running 5 s after sharedloop was killed: {left:?} (of {recorded:?})");
    }
}

fn store_args(env: &Env) -> [String; 4] {
    [
        "--loopback-root".into(),
        env.root.to_string_lossy().into(),
        "--loopback-fallback".into(),
        env.fallback.to_string_lossy().into(),
    ]
}

/// After the kill: the loop devices (the xfs copy's) go by autoclear, gc
/// removes the staging the killed add left, and nothing else is there.
fn gc_then_clean(env: &Env, ctx: &str) {
    assert!(wait_no_loops(&env.dir, Duration::from_secs(10)), "{ctx}: loop devices left: {:?}", env.my_loops());
    let mut argv: Vec<String> = vec![BIN.into(), "gc".into()];
    argv.extend(store_args(env));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    env.run(&argv).ok();
    env.assert_clean();
}

fn killed_add(fstype: &str, want: &str, files: usize, size: usize) {
    let env = Env::new(&format!("killbuild-{fstype}"));
    let src = env.dir.join("src");
    big_tree(&src, files, size);
    let mut argv: Vec<String> = vec![BIN.into(), "add".into(), src.to_string_lossy().into()];
    argv.extend(store_args(&env));
    argv.extend(["--fstype".into(), fstype.into()]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let ctx = format!("add --fstype {fstype}");
    kill_while_running(&env, &argv, want, &ctx);
    gc_then_clean(&env, &ctx);
    // The store still works: the same add, to the end.
    let r = env.run(&argv);
    r.ok();
    env.assert_clean();
}

#[test]
fn killed_add_takes_mkfs_ext4_down() {
    killed_add("ext4", "mkfs.ext4", 512, 64 << 10);
}

/// The ext4 build's second child, debugfs (root fix-up and nanosecond
/// mtimes, one line per inode), goes down with a SIGKILLed add just as
/// mkfs.ext4 does; 20,000 files make its run long enough to catch.
#[test]
fn killed_add_takes_ext4_debugfs_down() {
    killed_add("ext4", "debugfs", 20_000, 8);
}

/// SIGTERM while debugfs runs (stopped): add kills it and exits 8, and gc
/// leaves the store clean.
#[test]
fn sigterm_while_ext4_debugfs_runs_ends_it_and_exits_8() {
    let env = Env::new("termbuild-debugfs");
    let src = env.dir.join("src");
    big_tree(&src, 20_000, 8);
    let mut argv: Vec<String> = vec![BIN.into(), "add".into(), src.to_string_lossy().into()];
    argv.extend(store_args(&env));
    argv.extend(["--fstype".into(), "ext4".into()]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    signal_while_running(&env, &argv, "debugfs", "SIGTERM at ext4 debugfs", libc::SIGTERM);
    gc_then_clean(&env, "SIGTERM at ext4 debugfs");
}

/// erofs images are written in this process (no mkfs child): a SIGKILL
/// while the image is being written leaves its staging directory (the
/// writer's tail spill file is unlinked from the start), which gc removes.
#[test]
fn killed_erofs_add_leaves_only_what_gc_removes() {
    let env = Env::new("killbuild-erofs");
    let src = env.dir.join("src");
    big_tree(&src, 2048, 64 << 10);
    let mut argv: Vec<String> = vec![BIN.into(), "add".into(), src.to_string_lossy().into()];
    argv.extend(store_args(&env));
    argv.extend(["--fstype".into(), "erofs".into()]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let mut child: Child = env.command(&argv).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn");
    let tmp = env.fallback.join("tmp");
    let deadline = Instant::now() + START_WITHIN;
    let writing = || {
        std::fs::read_dir(&tmp).into_iter().flatten().flatten().any(|d| {
            std::fs::metadata(d.path().join("layer.img")).is_ok_and(|m| m.len() > 0)
        })
    };
    while !writing() {
        assert!(child.try_wait().unwrap().is_none(), "add finished before its image was seen being written");
        assert!(Instant::now() < deadline, "no image being written");
        std::thread::sleep(Duration::from_millis(1));
    }
    let h = sharedloop_below(child.id()).expect("sharedloop below the namespace holder");
    signal(h, libc::SIGKILL);
    child.wait().unwrap();
    gc_then_clean(&env, "add --fstype erofs");
    let r = env.run(&argv);
    r.ok();
    env.assert_clean();
}

/// build_xfs copies through a mount in `unshare -m ... sh -c 'mount; cp;
/// umount'`: the grandchildren (sh, cp) must die too, and the private
/// mount with its loop device go.
#[test]
fn killed_add_takes_the_xfs_copy_down() {
    killed_add("xfs", "cp", 512, 64 << 10);
}

/// mount.sharedloop creating its upper (mkfs.xfs of a large sparse image).
/// SIGTERM while the upper's mkfs runs (with it stopped, as on a store
/// that does not answer): the helper kills it, removes the half-made
/// image and exits 8 at once, with nothing for gc to do.
#[test]
fn sigterm_while_upper_mkfs_runs_ends_it_and_exits_8() {
    let env = Env::new("termbuild-upper");
    let top = env.add(None, Some("tb:1"), &[("a.txt", E::File("a\n"))]);
    let m = env.mnt("m");
    // The newest way this kernel has (any way makes the upper the same).
    let o = format!("{},mount_api={},upper=tb,upper_fstype=xfs,upper_size=64G", env.store_opts(), best_mount_api());
    signal_while_running(&env, &["mount.sharedloop", &top, m.to_str().unwrap(), "-o", &o], "mkfs.xfs", "SIGTERM at upper mkfs.xfs", libc::SIGTERM);
    assert!(env.overlay_at(&m).is_none());
    let left: Vec<_> = std::fs::read_dir(env.root.join("uppers")).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "uppers left: {left:?}");
    env.assert_clean();
}

#[test]
fn killed_mount_takes_upper_mkfs_down() {
    let env = Env::new("killbuild-upper");
    let top = env.add(None, Some("kb:1"), &[("a.txt", E::File("a\n"))]);
    let m = env.mnt("m");
    let o = format!("{},mount_api={},upper=kb,upper_fstype=xfs,upper_size=64G", env.store_opts(), best_mount_api());
    kill_while_running(&env, &["mount.sharedloop", &top, m.to_str().unwrap(), "-o", &o], "mkfs.xfs", "mount, upper mkfs.xfs");
    assert!(env.overlay_at(&m).is_none());
    if best_mount_api() != "fd" {
        // The path and legacy ways mount the layers in a scratch tmpfs:
        // a SIGKILL leaves it, and its layers' loop devices, until the next
        // command of the node sweeps scratch whose owner is dead.
        let mut argv: Vec<String> = vec![BIN.into(), "mounts".into()];
        argv.extend(store_args(&env));
        env.run(&argv.iter().map(String::as_str).collect::<Vec<_>>()).ok();
    }
    gc_then_clean(&env, "mount, upper mkfs.xfs");
    let left: Vec<_> = std::fs::read_dir(env.root.join("uppers")).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    assert!(left.is_empty(), "uppers left: {left:?}");
}
