//! Hardening, end to end: mount points that are not UTF-8, umount of
//! mounts that are not ours, the helpers' --help/--version, loop attach
//! while other processes attach and detach loop devices, and a helper
//! blocked where signals cannot reach it (the watchdog).

mod common;
use common::*;

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

const FP: &str = "SHAREDLOOP_FAILPOINT";
const VERSION: &str = env!("CARGO_PKG_VERSION");

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn show(o: &Output) -> String {
    format!("exit {:?} stdout={:?} stderr={:?}", o.status.code(), String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The namespace's mountinfo as bytes (env.mountinfo() wants UTF-8, which
/// a mount point need not be).
fn mountinfo_bytes(env: &Env) -> Vec<Vec<u8>> {
    std::fs::read(format!("/proc/{}/mountinfo", env.pid)).unwrap().split(|&b| b == b'\n').map(<[u8]>::to_vec).collect()
}

/// How mountinfo and utab write a path: space, tab, newline and backslash
/// as octal, every other byte as it is.
fn mount_escape(p: &[u8]) -> Vec<u8> {
    let mut out = vec![];
    for &b in p {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => out.extend(format!("\\{b:03o}").bytes()),
            _ => out.push(b),
        }
    }
    out
}

/// (fstype, source) of the topmost mount at `target`, by bytes.
fn mount_at(env: &Env, target: &Path) -> Option<(String, String)> {
    let want = mount_escape(target.as_os_str().as_bytes());
    mountinfo_bytes(env).into_iter().rev().find_map(|l| {
        let f: Vec<&[u8]> = l.split(|&b| b == b' ').collect();
        if f.len() < 5 || f[4] != want.as_slice() {
            return None;
        }
        let sep = f.iter().position(|x| *x == b"-")?;
        Some((String::from_utf8_lossy(f[sep + 1]).into_owned(), String::from_utf8_lossy(f[sep + 2]).into_owned()))
    })
}

/// A path in the namespace, readable from the host (bytes kept).
fn in_ns(env: &Env, p: &Path) -> PathBuf {
    PathBuf::from(format!("/proc/{}/root", env.pid)).join(p.strip_prefix("/").unwrap())
}

fn utab_bytes(env: &Env) -> Vec<u8> {
    std::fs::read(in_ns(env, Path::new("/run/mount/utab"))).unwrap_or_default()
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

// ---------------------------------------------------------- not UTF-8

#[test]
fn non_utf8_mount_point_end_to_end() {
    let env = Env::new("nonutf8");
    let top = env.add(None, Some("caf:1"), &[("a.txt", E::File("hello\n")), ("d/b.txt", E::File("b\n"))]);
    // "caf\xe9 x": Latin-1, not UTF-8, and a space that mountinfo and utab escape.
    let mut tb = env.dir.join("mnt").into_os_string().into_vec();
    tb.extend_from_slice(b"/caf\xe9 x");
    let target = PathBuf::from(OsString::from_vec(tb.clone()));
    std::fs::create_dir_all(&target).unwrap();

    let o = env.command(&["mount", "-t", "sharedloop", &top]).arg(&target).args(["-o", &env.store_opts()]).output().unwrap();
    assert_eq!(code(&o), 0, "mount(8): {}", show(&o));
    assert_eq!(mount_at(&env, &target), Some(("overlay".into(), top.clone())), "overlay at the non-UTF-8 target");
    assert_eq!(std::fs::read_to_string(in_ns(&env, &target.join("a.txt"))).unwrap(), "hello\n");
    assert_eq!(std::fs::read_to_string(in_ns(&env, &target.join("d/b.txt"))).unwrap(), "b\n");
    assert_eq!(records(&env).len(), 1);
    // utab: the path's bytes, the space as \040, 0xe9 as it is.
    let mut line = format!("SRC={top} TARGET=").into_bytes();
    line.extend(mount_escape(&tb));
    line.extend_from_slice(b" ROOT=/ OPTS=helper=sharedloop");
    let utab = utab_bytes(&env);
    assert!(contains(&utab, &line), "utab lacks {:?}: {:?}", String::from_utf8_lossy(&line), String::from_utf8_lossy(&utab));
    assert!(contains(&line, b"/caf\xe9\\040x "), "escaped form: {:?}", String::from_utf8_lossy(&line));
    // `sharedloop mounts` lists it and does not fall over on the bytes.
    let r = env.sl(&["mounts"]);
    r.ok();
    assert!(r.stdout.contains(&top) || r.stdout.contains("caf:1"), "{}", r.stdout);

    // umount(8) finds our helper by the utab line and takes it all down.
    let o = env.command(&["umount"]).arg(&target).output().unwrap();
    assert_eq!(code(&o), 0, "umount(8): {}", show(&o));
    assert_eq!(mount_at(&env, &target), None);
    assert_eq!(utab_bytes(&env), b"");
    assert_eq!(records(&env).len(), 0);
    env.assert_clean();

    // -f with a non-UTF-8 option value (a comment= mount(8) would pass on):
    // everything checked, nothing mounted.
    let mut ob = b"ro,comment=\xff,".to_vec();
    ob.extend_from_slice(env.store_opts().as_bytes());
    let o = env.command(&["mount.sharedloop", &top]).arg(&target).args(["-f", "-o"]).arg(os(&ob)).output().unwrap();
    assert_eq!(code(&o), 0, "-f: {}", show(&o));
    assert_eq!(o.stderr, b"", "-f: {}", show(&o));
    assert_eq!(mount_at(&env, &target), None, "-f mounted");
    assert_eq!(records(&env).len(), 0);
    assert_eq!(utab_bytes(&env), b"");

    // A path that does not exist, with a byte that is not UTF-8: exit 32,
    // the path named (shown with U+FFFD for the byte, as Path::display does).
    let o = env.command(&["umount.sharedloop"]).arg(os(b"/x\xff")).output().unwrap();
    assert_eq!(code(&o), 32, "{}", show(&o));
    assert_eq!(String::from_utf8_lossy(&o.stderr), "umount.sharedloop: /x\u{fffd}: not mounted (No such file or directory)\n");
    assert_eq!(o.stdout, b"");

    // The CLI with store paths that are not UTF-8 and not there: no panic,
    // exit 32 naming both.
    let o = env.command(&[BIN, "ls", "--loopback-root"]).arg(os(b"/x\xff")).arg("--loopback-fallback").arg(os(b"/y\xfe")).output().unwrap();
    assert_eq!(code(&o), 32, "{}", show(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stderr),
        "sharedloop: no store: /x\u{fffd}: No such file or directory; fallback /y\u{fffd}: No such file or directory\n"
    );
    // Only --loopback-root given: the default fallback is named too.
    let o = env.command(&[BIN, "ls", "--loopback-root"]).arg(os(b"/x\xff")).output().unwrap();
    assert!(!String::from_utf8_lossy(&o.stderr).contains("panicked"), "{}", show(&o));
    assert_eq!(code(&o), 32, "{}", show(&o));
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("sharedloop: no store: /x\u{fffd}: No such file or directory; fallback "), "{}", show(&o));
    env.assert_clean();
}

// ---------------------------------------------------------- not our mount

fn refused(env: &Env, argv: &[&str], target: &Path, why: &str, ctx: &str) {
    let r = env.run(argv);
    assert_eq!(r.code, 32, "{ctx}: {r:?}");
    assert_eq!(
        r.stderr,
        format!(
            "umount.sharedloop: {}: not a sharedloop mount ({why}); not unmounting it (umount -i unmounts without this helper)\n",
            target.display()
        ),
        "{ctx}"
    );
    assert_eq!(r.stdout, "", "{ctx}");
}

/// A utab line saying helper=sharedloop for `target` (as a stale line, or
/// one written by hand, would).
fn forge_utab(env: &Env, src: &str, target: &Path) {
    env.sh(&format!("echo 'SRC={src} TARGET={} ROOT=/ OPTS=helper=sharedloop' >> /run/mount/utab", s(target))).ok();
}

#[test]
fn umount_refuses_mounts_that_are_not_sharedloop() {
    let env = Env::new("notours");
    let t = env.dir.join("tmpfs");
    std::fs::create_dir_all(&t).unwrap();
    env.sh(&format!("mount -t tmpfs sl-hard-tmpfs {}", s(&t))).ok();
    std::fs::write(in_ns(&env, &t.join("keep")), "k").unwrap();
    let tmpfs_why = "a tmpfs mount (source \"sl-hard-tmpfs\")";
    refused(&env, &["umount.sharedloop", s(&t)], &t, tmpfs_why, "helper, tmpfs");
    assert_eq!(mount_at(&env, &t), Some(("tmpfs".into(), "sl-hard-tmpfs".into())), "tmpfs still mounted");
    // umount(8) runs our helper for a target whose utab line says
    // helper=sharedloop (a stale or forged line): the helper still refuses.
    // (`umount -t sharedloop DIR` does not: util-linux 2.38 takes the type
    // from mountinfo and unmounts a tmpfs itself.)
    forge_utab(&env, "sl-hard-tmpfs", &t);
    refused(&env, &["umount", s(&t)], &t, tmpfs_why, "umount(8) with a helper=sharedloop utab line, tmpfs");
    assert_eq!(mount_at(&env, &t), Some(("tmpfs".into(), "sl-hard-tmpfs".into())), "tmpfs still mounted");
    assert_eq!(std::fs::read_to_string(in_ns(&env, &t.join("keep"))).unwrap(), "k");
    // umount -i does not involve us.
    env.run(&["umount", "-i", s(&t)]).ok();
    assert_eq!(mount_at(&env, &t), None);
    assert_eq!(env.utab(), "", "umount(8) drops the line with the mount");

    // An overlay made by hand, with no record and no utab line of ours.
    let (lo, up, wk, ov) = (env.dir.join("lo"), env.dir.join("up"), env.dir.join("wk"), env.dir.join("ov"));
    for d in [&lo, &up, &wk, &ov] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(lo.join("f"), "lower\n").unwrap();
    env.sh(&format!("mount -t overlay sl-hard-ovl -o lowerdir={},upperdir={},workdir={} {}", s(&lo), s(&up), s(&wk), s(&ov))).ok();
    assert_eq!(std::fs::read_to_string(in_ns(&env, &ov.join("f"))).unwrap(), "lower\n");
    let ovl_why = "an overlay (source \"sl-hard-ovl\") that sharedloop has no record of";
    refused(&env, &["umount.sharedloop", s(&ov)], &ov, ovl_why, "helper, hand-made overlay");
    // (umount(8) runs no helper for it: there is no utab line; and a line
    // with this SOURCE and TARGET would make it ours by design, one with
    // another SOURCE does not match, so umount(8) unmounts it itself.)
    assert_eq!(mount_at(&env, &ov), Some(("overlay".into(), "sl-hard-ovl".into())), "overlay still mounted");
    env.run(&["umount", "-i", s(&ov)]).ok();
    assert_eq!(mount_at(&env, &ov), None);

    // Nothing mounted there: a directory that does not exist, and one that
    // exists but is no mount point. Exit 32, a clear message, not EINVAL.
    let gone = env.dir.join("nonexistent-dir");
    let plain = env.dir.join("plain-dir");
    std::fs::create_dir_all(&plain).unwrap();
    let cases: &[(&str, &Path, String)] = &[
        ("nonexistent", &gone, format!("umount.sharedloop: {}: not mounted (No such file or directory)\n", s(&gone))),
        ("not a mount point", &plain, format!("umount.sharedloop: {}: not mounted\n", s(&plain))),
    ];
    for (what, p, want) in cases {
        let r = env.run(&["umount.sharedloop", s(p)]);
        assert_eq!(r.code, 32, "{what}: {r:?}");
        assert_eq!(&r.stderr, want, "{what}");
        assert!(!r.stderr.contains("Invalid argument"), "{what}: {}", r.stderr);
    }
    env.assert_clean();
}

// ---------------------------------------------------------- --help, --version

#[test]
fn helpers_help_version_and_unknown_long_options() {
    let env = Env::new("helpver");
    let mu = "usage: mount.sharedloop SOURCE TARGET [-sfnvrw] [-o OPTIONS] [-t TYPE] [-N NAMESPACE]\n";
    let uu = "usage: umount.sharedloop TARGET [-nlfvr] [-t TYPE] [-N NAMESPACE]\n";
    // (argv, exit, stdout prefix, exact stderr)
    let cases: Vec<(Vec<&str>, i32, String, String)> = vec![
        (vec!["mount.sharedloop", "--help"], 0, mu.into(), "".into()),
        (vec!["mount.sharedloop", "src", "/mnt", "--help"], 0, mu.into(), "".into()),
        (vec!["mount.sharedloop", "--version"], 0, format!("mount.sharedloop (sharedloop {VERSION})\n"), "".into()),
        (vec!["umount.sharedloop", "--help"], 0, uu.into(), "".into()),
        (vec!["umount.sharedloop", "/mnt", "--help"], 0, uu.into(), "".into()),
        (vec!["umount.sharedloop", "--version"], 0, format!("umount.sharedloop (sharedloop {VERSION})\n"), "".into()),
        (vec!["mount.sharedloop", "--bogus"], 1, "".into(), "mount.sharedloop: unrecognized option \"--bogus\"\n".into()),
        (vec!["mount.sharedloop", "src", "/mnt", "--bogus"], 1, "".into(), "mount.sharedloop: unrecognized option \"--bogus\"\n".into()),
        (vec!["umount.sharedloop", "--bogus"], 1, "".into(), "umount.sharedloop: unrecognized option \"--bogus\"\n".into()),
        (vec!["umount.sharedloop", "/mnt", "--bogus"], 1, "".into(), "umount.sharedloop: unrecognized option \"--bogus\"\n".into()),
    ];
    for (argv, want, out, err) in &cases {
        let r = env.run(argv);
        assert_eq!(r.code, *want, "{argv:?}: {r:?}");
        assert!(r.stdout.starts_with(out.as_str()), "{argv:?}: stdout {:?}", r.stdout);
        assert_eq!(&r.stderr, err, "{argv:?}");
        if out.is_empty() {
            assert_eq!(r.stdout, "", "{argv:?}");
        }
        if argv.contains(&"--version") {
            assert_eq!(&r.stdout, out, "{argv:?}: one line");
        }
        if argv.contains(&"--help") {
            assert!(r.stdout.contains("(8) for the options"), "{argv:?}: {}", r.stdout);
        }
    }
    env.assert_clean();
}

// ---------------------------------------------------------- loop churn

/// A background process in the namespace that attaches its own file to a
/// free loop device and detaches that device again, until `stop` exists.
struct Churner {
    child: Child,
    reader: std::thread::JoinHandle<usize>,
}

fn churner(env: &Env, i: usize, stop: &Path) -> Churner {
    let backing = env.dir.join(format!("churn-{i}.img"));
    std::fs::File::create(&backing).unwrap().set_len(1 << 20).unwrap();
    // Only the device this loop itself attached (as --show printed it) is
    // ever detached.
    let script = format!(
        "while [ ! -e '{stop}' ]; do d=$(losetup -f --show '{f}') || continue; echo \"$d\"; losetup -d \"$d\" || {{ sleep 0.05; losetup -d \"$d\"; }}; done",
        stop = s(stop),
        f = s(&backing)
    );
    let mut child = env.command(&["sh", "-c", &script]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || BufReader::new(out).lines().map_while(|l| l.ok()).count());
    Churner { child, reader }
}

impl Churner {
    /// Stop (the stop file ends the loop between cycles; its pid is killed
    /// only if it does not): returns the cycles done.
    fn finish(mut self) -> usize {
        let start = Instant::now();
        loop {
            if self.child.try_wait().unwrap().is_some() {
                break;
            }
            if start.elapsed() > Duration::from_secs(15) {
                let _ = self.child.kill();
                let _ = self.child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.reader.join().unwrap()
    }
}

#[test]
fn loop_attach_under_churn() {
    let env = Env::new("churn");
    let t0 = Instant::now();
    const N: usize = 100;
    let mut top: Option<String> = None;
    for i in 0..N {
        let name = format!("f{i}.txt");
        let body = format!("{i}\n");
        let nm = (i == N - 1).then_some("churn:top");
        top = Some(env.add(top.as_deref(), nm, &[(name.as_str(), E::File(&body))]));
    }
    let top = top.unwrap();
    let built = t0.elapsed();
    let m = env.mnt("m");
    let stop = env.dir.join("churn-stop");
    let churners: Vec<Churner> = (0..2).map(|i| churner(&env, i, &stop)).collect();
    // Let them get going.
    std::thread::sleep(Duration::from_millis(200));
    let t1 = Instant::now();
    let mut results = vec![];
    for round in 0..3 {
        let r = helper(&env, &top, &m, "ro");
        results.push((round, r.code, r.stderr.clone()));
        if r.code != 0 {
            break;
        }
        assert!(env.overlay_at(&m).is_some(), "round {round}: not mounted");
        assert_eq!(read_in(&env, &m.join("f0.txt")).as_deref(), Some("0\n"), "round {round}");
        assert_eq!(read_in(&env, &m.join(format!("f{}.txt", N - 1))).as_deref(), Some(format!("{}\n", N - 1).as_str()), "round {round}");
        assert_eq!(list_in(&env, &m).len(), N, "round {round}");
        let layer_loops = env.my_loops().iter().filter(|(_, b)| !b.contains("/churn-")).count();
        assert_eq!(layer_loops, N, "round {round}: one loop device a layer");
        env.run(&["umount", s(&m)]).ok();
        assert!(env.overlay_at(&m).is_none(), "round {round}: still mounted");
    }
    let mounted = t1.elapsed();
    std::fs::write(&stop, "").unwrap();
    let cycles: Vec<usize> = churners.into_iter().map(Churner::finish).collect();
    // Their devices: each detached by the loop that attached it.
    assert!(
        wait_no_loops(&env.dir, Duration::from_secs(10)),
        "loop devices left: {:?}",
        env.my_loops()
    );
    eprintln!("{N} layers built in {built:?}; 3 mounts under churn in {mounted:?}; churn cycles {cycles:?}");
    for (round, c, err) in &results {
        assert_eq!(*c, 0, "mount {round} under churn failed: {err}");
    }
    assert!(cycles.iter().all(|&c| c > 0), "churners did not run: {cycles:?}");
    let _ = std::fs::remove_file(&stop);
    for i in 0..2 {
        let _ = std::fs::remove_file(env.dir.join(format!("churn-{i}.img")));
    }
    assert_eq!(records(&env).len(), 0);
    assert_eq!(env.utab(), "");
    env.assert_clean();
}

// ---------------------------------------------------------- watchdog

/// The mount.sharedloop process at or below `root`.
fn find_helper(root: u32) -> u32 {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let mut stack = vec![root];
        while let Some(p) = stack.pop() {
            let argv0 = std::fs::read(format!("/proc/{p}/cmdline")).ok().and_then(|b| b.split(|&c| c == 0).next().map(<[u8]>::to_vec));
            if argv0.is_some_and(|a| a.ends_with(b"mount.sharedloop")) {
                return p;
            }
            stack.extend(children_of(p));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("no mount.sharedloop process below {root}");
}

/// A helper blocked at `fp` (ignoring signals, as in an uninterruptible
/// system call) gets SIGTERM: the watchdog ends it with exit 8 after its
/// grace, and nothing of it is left.
fn blocked_then_sigterm(env: &Env, top: &str, m: &Path, fp: &str, api: &str) {
    let o = format!("{},mount_api={api}", env.store_opts());
    let mut c = env.command(&["mount.sharedloop", top, s(m), "-o", &o]);
    c.env(FP, format!("block:{fp}")).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    err.read_line(&mut first).unwrap();
    assert_eq!(first, format!("sharedloop: blocked at {fp}\n"), "{fp}");
    let pid = find_helper(child.id());
    let t = Instant::now();
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGTERM) }, 0);
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    let st = child.wait().unwrap();
    let took = t.elapsed();
    assert_eq!(st.code(), Some(8), "{fp}: {st:?} {rest}");
    assert!(took >= Duration::from_secs(4) && took < Duration::from_secs(15), "{fp}: exit after {took:?} (grace is 5 s)");
    assert!(rest.contains("mount.sharedloop: signal 15: still not done 5 s later"), "{fp}: {rest}");
    assert!(!rest.contains("panicked"), "{fp}: {rest}");
    assert!(env.overlay_at(m).is_none(), "{fp}: mounted");
    assert_eq!(records(env).len(), 0, "{fp}: record left");
    assert_eq!(env.utab(), "", "{fp}: utab line left");
    env.assert_clean();
}

#[test]
fn sigterm_while_blocked_exits_8_by_the_watchdog() {
    let env = Env::new("blocked");
    let a = env.add(None, None, &[("a.txt", E::File("a\n"))]);
    let top = env.add(Some(&a), Some("blk:1"), &[("b.txt", E::File("b\n"))]);
    let m = env.mnt("m");
    // Every way: the path and legacy ways hold their layers in a scratch
    // mount that is attached, which the watchdog must detach itself.
    for (api, fp) in mount_apis().into_iter().flat_map(|a| [(a, "resolve"), (a, "layer-mount@1")]) {
        blocked_then_sigterm(&env, &top, &m, fp, api);
        // And the same image mounts normally afterwards.
        helper(&env, &top, &m, "").ok();
        assert_eq!(read_in(&env, &m.join("a.txt")).as_deref(), Some("a\n"), "after {fp}");
        assert_eq!(records(&env).len(), 1);
        env.run(&["umount", s(&m)]).ok();
        assert_eq!(env.utab(), "");
        assert_eq!(records(&env).len(), 0);
        env.assert_clean();
    }
}
