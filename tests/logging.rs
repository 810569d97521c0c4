//! Every failure is logged once, with its reason, to stderr and to syslog
//! (identity = program name, facility daemon); -v adds the steps.

mod common;
use common::*;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

fn drain(sock: &UnixDatagram) -> Vec<String> {
    let mut out = vec![];
    let mut buf = [0u8; 8192];
    sock.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    while let Ok(n) = sock.recv(&mut buf) {
        out.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    out
}

#[test]
fn failures_reach_syslog_once() {
    let env = Env::new("syslog");
    let top = env.add(None, Some("img:1"), &[("a", E::File("a"))]);
    let path = env.dir.join("log.sock");
    let sock = UnixDatagram::bind(&path).unwrap();
    let sp = path.to_str().unwrap();
    let m = env.mnt("m");
    let ms = m.to_str().unwrap();

    // A refusal: unknown option (usage, exit 1).
    let r = env.run_env(&["mount.sharedloop", &top, ms, "-o", "bogus"], &[("SHAREDLOOP_SYSLOG_SOCKET", sp)]);
    r.fails(1, "mount.sharedloop: unknown option \"bogus\"");
    let msgs = drain(&sock);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    // <27> = facility daemon (3) * 8 + severity err (3); tag = program[pid].
    assert!(msgs[0].starts_with("<27>"), "{}", msgs[0]);
    assert!(msgs[0].contains("mount.sharedloop["), "{}", msgs[0]);
    assert!(msgs[0].ends_with("unknown option \"bogus\""), "{}", msgs[0]);
    assert_eq!(r.stderr.lines().count(), 1, "{}", r.stderr);

    // A mount failure names the path and errno, once.
    let missing = env.dir.join("nope");
    let r = env.run_env(&["mount.sharedloop", &top, missing.to_str().unwrap(), "-o", &env.store_opts()], &[("SHAREDLOOP_SYSLOG_SOCKET", sp)]);
    r.fails(32, &format!("mount point: {}: No such file or directory", missing.display()));
    let msgs = drain(&sock);
    assert_eq!(msgs.len(), 1, "{msgs:?}");
    assert!(msgs[0].ends_with(&format!("mount point: {}: No such file or directory", missing.display())), "{}", msgs[0]);

    // -v: the steps go to stderr and syslog (severity info: <30>), success is quiet otherwise.
    let r = env.run_env(&["mount.sharedloop", &top, ms, "-v", "-o", &env.store_opts()], &[("SHAREDLOOP_SYSLOG_SOCKET", sp)]);
    r.ok();
    let msgs = drain(&sock);
    assert!(msgs.iter().any(|l| l.starts_with("<30>") && l.contains(&format!("mounted {top} at {ms}"))), "{msgs:?}");
    assert!(r.stderr.contains(&format!("mount.sharedloop: mounted {top} at {ms}")), "{}", r.stderr);
    let r = env.run_env(&["umount", ms], &[("SHAREDLOOP_SYSLOG_SOCKET", sp)]);
    r.ok();
    assert_eq!(r.stderr, "");
    assert!(drain(&sock).is_empty(), "a quiet umount logs nothing");
    env.assert_clean();
}
