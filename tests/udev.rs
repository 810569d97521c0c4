//! udev/59-sharedloop.rules, run by the real `udevadm test` against real
//! loop devices.
//!
//! Each case attaches a loop device (read-only) to a file laid out like a
//! store entry, then runs `udevadm test --action=change /sys/block/loopN` in
//! a private mount namespace where a tmpfs covers /run (so the rules file is
//! put in /run/udev/rules.d, and the udev database udevadm writes goes to the
//! tmpfs) and another covers /dev (udevadm test of systemd 252 really creates
//! the links it plans). The host sees none of it. udevadm test does write
//! sysfs attributes for real: the device's read_ahead_kb is restored before
//! the device is detached.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

const RULES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/udev/59-sharedloop.rules");
const RULES_NAME: &str = "59-sharedloop.rules";
const HEX: &str = "3f2a9c1b7d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8";

static SEQ: AtomicU32 = AtomicU32::new(0);

fn udevadm() -> &'static str {
    for p in ["/usr/bin/udevadm", "/bin/udevadm", "/sbin/udevadm", "/usr/sbin/udevadm"] {
        if Path::new(p).exists() {
            return p;
        }
    }
    panic!("udevadm not found: install the Debian package udev (scripts/install-deps.sh does)");
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("sl-udev-{name}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst)));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A loop device this test attached; detached (exactly this one) on drop,
/// after its read-ahead is put back to what it was.
struct Loop {
    dev: String,
    name: String,
    read_ahead: String,
}

impl Loop {
    fn attach(file: &Path) -> Loop {
        if let Some(parent) = file.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(file, vec![0u8; 1 << 20]).unwrap();
        let o = Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(file).output().expect("run losetup");
        assert!(o.status.success(), "losetup: {}", String::from_utf8_lossy(&o.stderr));
        let dev = String::from_utf8_lossy(&o.stdout).trim().to_string();
        let name = dev.strip_prefix("/dev/").expect("losetup printed a /dev path").to_string();
        // The guard exists from here on: a failing check still detaches.
        let mut l = Loop { read_ahead: String::new(), dev, name };
        l.read_ahead = std::fs::read_to_string(l.sys("queue/read_ahead_kb")).unwrap().trim().to_string();
        let backing = std::fs::read_to_string(l.sys("loop/backing_file")).unwrap();
        assert_eq!(backing.trim(), file.to_str().unwrap());
        l
    }

    fn sys(&self, attr: &str) -> PathBuf {
        Path::new("/sys/block").join(&self.name).join(attr)
    }

    fn minor(&self) -> u32 {
        self.name.trim_start_matches("loop").parse().unwrap()
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        if !self.read_ahead.is_empty() {
            let _ = std::fs::write(self.sys("queue/read_ahead_kb"), &self.read_ahead);
        }
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// `udevadm test --action=change` for the device, with the rules file in
/// /run/udev/rules.d of a private mount namespace. Returns stdout+stderr.
fn udevadm_test(l: &Loop) -> String {
    let script = format!(
        "set -e\n\
         mount -t tmpfs -o mode=0755 sl-udev-run /run\n\
         mkdir -p /run/udev/rules.d\n\
         cp {rules} /run/udev/rules.d/{name}\n\
         mount -t tmpfs -o mode=0755 sl-udev-dev /dev\n\
         mknod -m 0666 /dev/null c 1 3\n\
         mknod -m 0660 /dev/{dev} b 7 {minor}\n\
         exec {udevadm} test --action=change /sys/block/{dev} 2>&1\n",
        rules = RULES,
        name = RULES_NAME,
        dev = l.name,
        minor = l.minor(),
        udevadm = udevadm(),
    );
    let o = Command::new("unshare")
        .args(["-m", "--propagation", "private", "--", "sh", "-c", &script])
        .env("SYSTEMD_LOG_LEVEL", "debug")
        .stdin(Stdio::null())
        .output()
        .expect("run unshare");
    let out = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "udevadm test failed ({:?}):\n{out}", o.status);
    assert!(out.contains(&format!("Reading rules file: /run/udev/rules.d/{RULES_NAME}")), "rules file not read:\n{out}");
    // The rules file parses cleanly: udev logs parse problems as
    // "file:line message", without the device name in front that the lines
    // of the event itself carry.
    let event_prefix = format!("{}: ", l.name);
    for line in out.lines().filter(|x| x.contains(RULES_NAME)) {
        assert!(
            // An installed copy (make install, the .deb) is overridden by
            // the one under test in /run: udev says so, which is fine.
            line.starts_with(&event_prefix) || line.starts_with("Reading rules file") || line.starts_with("Skipping overridden file"),
            "udev complains about the rules file: {line}\n{out}"
        );
    }
    out
}

/// Properties printed at the end of `udevadm test`.
fn property<'a>(out: &'a str, key: &str) -> Option<&'a str> {
    out.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

fn rules_line(n: usize) -> String {
    std::fs::read_to_string(RULES).unwrap().lines().nth(n - 1).unwrap_or("").to_string()
}

/// What the rules must do for a sharedloop device, whose link (under /dev)
/// is `link`.
#[track_caller]
fn assert_sharedloop(l: &Loop, out: &str, link: &str) {
    let dev = &l.name;
    // The PROGRAM recognised the path (a failing one logs "returned N (error)").
    assert!(!out.lines().any(|x| x.contains(RULES_NAME) && x.contains("(error)")), "{out}");
    // The link is planned...
    assert!(out.contains(&format!("{dev}: /run/udev/rules.d/{RULES_NAME}:")) && out.contains(&format!(" LINK '{link}'")), "no LINK '{link}':\n{out}");
    let devlinks = property(out, "DEVLINKS").unwrap_or("");
    assert!(devlinks.split(' ').any(|d| d == format!("/dev/{link}")), "DEVLINKS={devlinks}, want /dev/{link}\n{out}");
    // ...and is the only one: no /dev/disk/by-* links (persistent storage skipped).
    assert!(!devlinks.contains("/dev/disk/"), "persistent-storage links made: {devlinks}");
    // blkid probing is skipped.
    assert_eq!(property(out, "UDEV_DISABLE_PERSISTENT_STORAGE_RULES_FLAG"), Some("1"), "{out}");
    assert!(!out.contains("builtin command 'blkid'"), "blkid probed a sharedloop device:\n{out}");
    assert!(property(out, "ID_FS_TYPE").is_none(), "{out}");
    // read_ahead_kb is written, by our file...
    let sysattr = format!("/sys/devices/virtual/block/{dev}/queue/read_ahead_kb");
    let attr_line = out
        .lines()
        .find(|x| x.contains(&format!("ATTR '{sysattr}' writing '4096'")))
        .unwrap_or_else(|| panic!("read_ahead_kb not written:\n{out}"));
    let n: usize = attr_line
        .split(&format!("{RULES_NAME}:"))
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("ATTR write not from {RULES_NAME}: {attr_line}"));
    // ...on the line that also sets nowatch, as final so that 60-block.rules'
    // OPTIONS+="watch" cannot undo it (udevadm test does not print the watch
    // state itself, so the line it reports executing is checked).
    let line = rules_line(n);
    assert!(line.contains("OPTIONS:=\"nowatch\""), "line {n} does not set nowatch: {line}");
    assert!(line.contains("ENV{UDEV_DISABLE_PERSISTENT_STORAGE_RULES_FLAG}=\"1\""), "{line}");
    // And udev really wrote it (systemd 252's udevadm test writes attributes).
    let ra = std::fs::read_to_string(l.sys("queue/read_ahead_kb")).unwrap();
    if !out.contains("skipping writing") {
        assert_eq!(ra.trim(), "4096");
    }
    // 60-block.rules, which adds the watch we override, is the one we order
    // before: our file must sort before 60-*.rules.
    assert!(RULES_NAME < "60-block.rules" && RULES_NAME < "60-persistent-storage.rules");
}

/// A loop device that is not a sharedloop image: none of it.
#[track_caller]
fn assert_untouched(l: &Loop, out: &str) {
    assert!(!out.contains("LINK 'sharedloop/"), "{out}");
    let devlinks = property(out, "DEVLINKS").unwrap_or("");
    assert!(!devlinks.contains("sharedloop"), "DEVLINKS={devlinks}");
    assert!(property(out, "SHAREDLOOP_DEVICE").is_none(), "{out}");
    assert!(property(out, "UDEV_DISABLE_PERSISTENT_STORAGE_RULES_FLAG").is_none(), "{out}");
    assert!(!out.contains("read_ahead_kb"), "read_ahead_kb written:\n{out}");
    // The stock rules still probe it as usual (our file does not get in the way).
    assert!(out.contains("builtin command 'blkid'"), "persistent-storage rules did not run:\n{out}");
    let ra = std::fs::read_to_string(l.sys("queue/read_ahead_kb")).unwrap();
    assert_eq!(ra.trim(), l.read_ahead);
}

#[test]
fn layer_image_gets_link_nowatch_readahead() {
    let t = TempDir::new("layer");
    let l = Loop::attach(&t.0.join(format!("store/layers/{HEX}/layer.img")));
    let out = udevadm_test(&l);
    assert_sharedloop(&l, &out, &format!("sharedloop/{HEX}"));
    assert_eq!(property(&out, "SHAREDLOOP_DEVICE"), Some("layer"));
    assert_eq!(property(&out, "SHAREDLOOP_CHAIN_ID"), Some(format!("sha256:{HEX}").as_str()));
}

#[test]
fn named_upper_gets_link() {
    let t = TempDir::new("upper");
    let l = Loop::attach(&t.0.join("store/uppers/debian-node1.img"));
    let out = udevadm_test(&l);
    assert_sharedloop(&l, &out, "sharedloop/upper/debian-node1");
    assert_eq!(property(&out, "SHAREDLOOP_DEVICE"), Some("upper"));
    assert_eq!(property(&out, "SHAREDLOOP_UPPER"), Some("debian-node1"));
}

#[test]
fn upper_name_with_slash_is_decoded() {
    // The store keeps '/' in names as %2F in the file name.
    let t = TempDir::new("upper-slash");
    let l = Loop::attach(&t.0.join("store/uppers/team%2Fapp:1.img"));
    let out = udevadm_test(&l);
    assert_sharedloop(&l, &out, "sharedloop/upper/team/app:1");
    assert_eq!(property(&out, "SHAREDLOOP_UPPER"), Some("team/app:1"));
}

#[test]
fn other_loop_device_is_left_alone() {
    let t = TempDir::new("other");
    let l = Loop::attach(&t.0.join("images/disk.img"));
    let out = udevadm_test(&l);
    assert_untouched(&l, &out);
}

#[test]
fn look_alike_paths_are_left_alone() {
    // Match the globs, but are no sharedloop entries: the PROGRAM refuses.
    let t = TempDir::new("lookalike");
    for rel in [
        "store/layers/not-a-chain-id/layer.img",
        "store/layers/3F2A9C1B7D4E5F60718293A4B5C6D7E8F90A1B2C3D4E5F60718293A4B5C6D7E8/layer.img",
        "store/layers/3f2a9c1b7d4e/layer.img",
        "store/layers/x/layers/y/notlayers/layer.img",
        "store/uppers/..%2F..%2Fdisk%2Fby-id%2Fx.img",
        "store/uppers/.hidden.img",
        "store/uppers/sub/dir.img",
    ] {
        let l = Loop::attach(&t.0.join(rel));
        let out = udevadm_test(&l);
        assert!(!out.contains("LINK 'sharedloop"), "{rel}: {out}");
        assert!(property(&out, "SHAREDLOOP_DEVICE").is_none(), "{rel}: {out}");
        assert!(!out.contains("read_ahead_kb"), "{rel}: {out}");
        drop(l);
    }
}
