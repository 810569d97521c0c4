//! scripts/kernel-surface and sharedloop-kernel-surface (issue 9): under
//! each emulated surface the release shown is the old one, exactly the
//! system calls that came later fail with ENOSYS (in the command and in
//! every process below it), the argument-level refusals are EINVAL, all
//! else still works; and sharedloop's probes find what the table in
//! tests/common (`Features::of`) says.
//!
//! The system calls are made by perl's `syscall` (perl-base is essential
//! on Debian: no compiler, no unsafe Rust here), and once through strace,
//! which must see the same. Built only with `--features kernel-surface`
//! (the tool is); skipped when the suite itself runs under a surface.

#![cfg(feature = "kernel-surface")]

mod common;
use common::*;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

const TOOL: &str = env!("CARGO_BIN_EXE_sharedloop-kernel-surface");

const ENOSYS: i32 = libc::ENOSYS;
const EINVAL: i32 = libc::EINVAL;
const ENOTTY: i32 = libc::ENOTTY;

/// x86_64 numbers of the calls 4.19..5.14 added, and 5.15..6.17 added:
/// kept here apart from the tool's own lists, as the check of them.
const NEW_IN_5: &[(&str, i64)] = &[
    ("pidfd_send_signal", 424),
    ("io_uring_setup", 425),
    ("io_uring_enter", 426),
    ("io_uring_register", 427),
    ("open_tree", 428),
    ("move_mount", 429),
    ("fsopen", 430),
    ("fsconfig", 431),
    ("fsmount", 432),
    ("fspick", 433),
    ("pidfd_open", 434),
    ("clone3", 435),
    ("close_range", 436),
    ("openat2", 437),
    ("pidfd_getfd", 438),
    ("faccessat2", 439),
    ("process_madvise", 440),
    ("epoll_pwait2", 441),
    ("mount_setattr", 442),
    ("quotactl_fd", 443),
    ("landlock_create_ruleset", 444),
    ("landlock_add_rule", 445),
    ("landlock_restrict_self", 446),
    ("memfd_secret", 447),
];
const NEW_AFTER_5_14: &[(&str, i64)] = &[
    ("process_mrelease", 448),
    ("futex_waitv", 449),
    ("set_mempolicy_home_node", 450),
    ("cachestat", 451),
    ("fchmodat2", 452),
    ("map_shadow_stack", 453),
    ("futex_wake", 454),
    ("futex_wait", 455),
    ("futex_requeue", 456),
    ("statmount", 457),
    ("listmount", 458),
    ("lsm_get_self_attr", 459),
    ("lsm_set_self_attr", 460),
    ("lsm_list_modules", 461),
    ("mseal", 462),
    ("setxattrat", 463),
    ("getxattrat", 464),
    ("listxattrat", 465),
    ("removexattrat", 466),
    ("open_tree_attr", 467),
    ("file_getattr", 468),
    ("file_setattr", 469),
];

/// Real calls whose results differ by surface, then every number given as
/// an argument with zero arguments (only ever run where it must be
/// ENOSYS, so nothing happens). One line each: NAME ok|ERRNO.
const PROBE: &str = r#"
use strict; use warnings; use Fcntl;
$| = 1;
sub r { my ($n, $v) = @_; print "$n ", ($v == -1 ? $! + 0 : "ok"), "\n"; }
# syscall passes strings by pointer: they must be variables, not literals.
my ($slash, $tmpfs, $overlay, $lower) = ("/", "tmpfs", "overlay", "lowerdir+");
# struct open_how { flags = O_PATH, mode, resolve = RESOLVE_NO_SYMLINKS }
my $how = pack("QQQ", 0x200000, 0, 4);
r("openat2", syscall(437, -100, $slash, $how, 24));
r("fsopen_tmpfs", syscall(430, $tmpfs, 0));
my $ctx = syscall(430, $overlay, 0);
r("fsopen_overlay", $ctx);
sysopen(my $root, "/", 0x200000 | O_DIRECTORY) or die "open /: $!";
r("fsconfig_set_string", syscall(431, $ctx, 1, $lower, $slash, 0));
r("fsconfig_set_fd", syscall(431, $ctx, 5, $lower, 0, fileno($root)));
sysopen(my $null, "/dev/null", O_RDWR) or die "open /dev/null: $!";
# LOOP_CONFIGURE on what is no loop device: ENOTTY where the call is let
# through; FIOCLEX must work everywhere.
r("ioctl_loop_configure", syscall(16, fileno($null), 0x4C0A, 0));
r("ioctl_fioclex", syscall(16, fileno($null), 0x5451, 0));
r("pidfd_open", syscall(434, $$ + 0, 0));
r("close_range", syscall(436, 900, 901, 0));
r("faccessat2", syscall(439, -100, $slash, 0, 0));
r("getpid", syscall(39));
for my $nr (@ARGV) { r("nr$nr", syscall($nr + 0, 0, 0, 0, 0, 0, 0)); }
"#;

fn surface_script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("scripts/kernel-surface")
}

/// `scripts/kernel-surface SURFACE ARGV...`, with this build's tool.
fn under(surface: &str, argv: &[&str]) -> Run {
    run(under_cmd(surface, argv))
}

fn under_cmd(surface: &str, argv: &[&str]) -> Command {
    let mut c = Command::new(surface_script());
    c.arg(surface).arg("--").args(argv).env("SHAREDLOOP_KERNEL_SURFACE_BIN", TOOL).env_remove("SHAREDLOOP_TEST_KERNEL");
    c
}

fn run(mut c: Command) -> Run {
    let o = c.output().expect("run");
    Run { code: o.status.code().unwrap_or(-1), stdout: String::from_utf8_lossy(&o.stdout).into(), stderr: String::from_utf8_lossy(&o.stderr).into() }
}

/// The probe's lines: name -> None (worked) or Some(errno).
fn results(r: &Run) -> BTreeMap<String, Option<i32>> {
    r.ok();
    r.stdout
        .lines()
        .map(|l| {
            let (n, v) = l.split_once(' ').unwrap_or_else(|| panic!("bad probe line {l:?}"));
            (n.to_string(), if v == "ok" { None } else { Some(v.parse().unwrap()) })
        })
        .collect()
}

/// The probe, as the command's grandchild (sh, sh, perl): what the filter
/// does reaches every process below the command.
fn probe(surface: Option<&str>, nrs: &[(&str, i64)]) -> BTreeMap<String, Option<i32>> {
    let nums: Vec<String> = nrs.iter().map(|(_, n)| n.to_string()).collect();
    let mut argv: Vec<&str> = vec!["sh", "-c", r#"sh -c 'exec perl -e "$SL_PROBE" -- "$@"' inner "$@""#, "outer"];
    argv.extend(nums.iter().map(|s| s.as_str()));
    let mut c = match surface {
        Some(k) => under_cmd(k, &argv),
        None => {
            let mut c = Command::new(argv[0]);
            c.args(&argv[1..]);
            c
        }
    };
    c.env("SL_PROBE", PROBE);
    results(&run(c))
}

fn skip_under_a_surface() -> bool {
    if let Some(k) = kernel_surface() {
        eprintln!("kernel_surface: already under kernel {k}: the native baseline cannot be had here, skipped");
        return true;
    }
    false
}

#[track_caller]
fn expect(got: &BTreeMap<String, Option<i32>>, want: &[(&str, Option<i32>)], ctx: &str) {
    for (name, w) in want {
        assert_eq!(got.get(*name), Some(w), "{ctx}: {name}: want {}, all: {got:?}", w.map_or("success".to_string(), |e| format!("errno {e}")));
    }
}

#[test]
fn release_and_environment_are_the_old_kernels() {
    if skip_under_a_surface() {
        return;
    }
    let real = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    // The script's file of the release, in a TMPDIR of this test's own.
    let tmp = std::env::temp_dir().join(format!("sl-surface-tmp-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    for (k, rel) in [("4.18", "4.18.0-553.el8_10.x86_64"), ("5.14", "5.14.0-503.el9.x86_64")] {
        let mut c = under_cmd(k, &["sh", "-c", "cat /proc/sys/kernel/osrelease; echo \"$SHAREDLOOP_TEST_KERNEL\"; uname -r"]);
        c.env("TMPDIR", &tmp);
        let r = run(c);
        r.ok();
        let lines: Vec<&str> = r.stdout.lines().collect();
        assert_eq!(lines[0], rel, "{k}: osrelease (what sharedloop reads): {r:?}");
        assert_eq!(lines[1], k, "{k}: SHAREDLOOP_TEST_KERNEL");
        // uname(2) is not a file: a mount cannot change it, and the
        // tests must not rely on `uname -r` under a surface.
        assert_eq!(lines[2], real.trim(), "{k}: uname(2) still says the real release");
        // The fake release lived in the command's own mount namespace.
        assert_eq!(std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap(), real, "{k}: the host's release changed");
        let left: Vec<_> = std::fs::read_dir(&tmp).unwrap().flatten().map(|e| e.path()).collect();
        assert!(left.is_empty(), "{k}: release file left: {left:?}");
    }
    std::fs::remove_dir(&tmp).unwrap();
}

#[test]
fn usage_errors() {
    if skip_under_a_surface() {
        return;
    }
    for args in [&["9.9", "true"][..], &["4.18"], &["4.18", "--"], &[]] {
        let r = run({
            let mut c = Command::new(TOOL);
            c.args(args);
            c
        });
        r.fails(2, "usage: sharedloop-kernel-surface 4.18|5.14 [--] CMD ARGS...");
        let r = run({
            let mut c = Command::new(surface_script());
            c.args(args).env("SHAREDLOOP_KERNEL_SURFACE_BIN", TOOL);
            c
        });
        r.fails(2, "usage: ");
    }
    let r = run({
        let mut c = Command::new(TOOL);
        c.args(["5.14", "/nonexistent/cmd"]);
        c
    });
    r.fails(127, "sharedloop-kernel-surface: /nonexistent/cmd: No such file or directory");
    // The command's exit status is passed on.
    assert_eq!(under("4.18", &["sh", "-c", "exit 7"]).code, 7);
}

/// The same probe natively (the baseline: the calls are real and work
/// here), under 5.14 and under 4.18.
#[test]
fn system_calls_of_each_surface() {
    if skip_under_a_surface() {
        return;
    }
    let native = probe(None, &[]);
    let all_work: Vec<(&str, Option<i32>)> = ["openat2", "fsopen_tmpfs", "fsopen_overlay", "fsconfig_set_string", "fsconfig_set_fd", "ioctl_fioclex", "pidfd_open", "close_range", "faccessat2", "getpid"]
        .into_iter()
        .map(|n| (n, None))
        .collect();
    expect(&native, &all_work, "native");
    expect(&native, &[("ioctl_loop_configure", Some(ENOTTY))], "native");

    // 5.14: everything of 5.x works but overlayfs takes no layer by fd.
    let nrs = NEW_AFTER_5_14;
    let rhel9 = probe(Some("5.14"), nrs);
    let mut want: Vec<(&str, Option<i32>)> = all_work.iter().filter(|(n, _)| *n != "fsconfig_set_fd").cloned().collect();
    want.push(("fsconfig_set_fd", Some(EINVAL)));
    want.push(("ioctl_loop_configure", Some(ENOTTY)));
    expect(&rhel9, &want, "5.14");
    let gone: Vec<(String, Option<i32>)> = nrs.iter().map(|(_, n)| (format!("nr{n}"), Some(ENOSYS))).collect();
    for (n, w) in &gone {
        assert_eq!(rhel9.get(n), Some(w), "5.14: {n} ({:?}) must be ENOSYS: {rhel9:?}", nrs.iter().find(|(_, x)| format!("nr{x}") == *n));
    }

    // 4.18: none of 5.x; LOOP_CONFIGURE unknown to the loop driver.
    let nrs: Vec<(&str, i64)> = NEW_IN_5.iter().chain(NEW_AFTER_5_14).cloned().collect();
    let rhel8 = probe(Some("4.18"), &nrs);
    let want: Vec<(&str, Option<i32>)> = vec![
        ("openat2", Some(ENOSYS)),
        ("fsopen_tmpfs", Some(ENOSYS)),
        ("fsopen_overlay", Some(ENOSYS)),
        ("fsconfig_set_string", Some(ENOSYS)),
        ("fsconfig_set_fd", Some(ENOSYS)),
        ("ioctl_loop_configure", Some(EINVAL)),
        ("ioctl_fioclex", None),
        ("pidfd_open", Some(ENOSYS)),
        ("close_range", Some(ENOSYS)),
        ("faccessat2", Some(ENOSYS)),
        ("getpid", None),
    ];
    expect(&rhel8, &want, "4.18");
    for (name, n) in &nrs {
        assert_eq!(rhel8.get(&format!("nr{n}")), Some(&Some(ENOSYS)), "4.18: {name} ({n}) must be ENOSYS: {rhel8:?}");
    }
}

/// strace sees the same: the calls fail in the kernel's answer, with the
/// errno the old kernel gives; and processes still fork and run.
#[test]
fn strace_sees_enosys_and_einval() {
    if skip_under_a_surface() {
        return;
    }
    let trace = std::env::temp_dir().join(format!("sl-surface-trace-{}", std::process::id()));
    let t = trace.to_str().unwrap();
    for (k, want) in [
        ("4.18", vec![r#"openat2(AT_FDCWD, "/", "#, "= -1 ENOSYS", r#"fsopen("tmpfs", 0) = -1 ENOSYS"#, "LOOP_CONFIGURE, NULL) = -1 EINVAL"]),
        ("5.14", vec![r#"fsopen("overlay", 0) = "#, r#"FSCONFIG_SET_FD, "lowerdir+", NULL, "#, "= -1 EINVAL", "LOOP_CONFIGURE, NULL) = -1 ENOTTY"]),
    ] {
        let r = under(k, &["strace", "-f", "-qq", "-o", t, "-e", "trace=openat2,fsopen,fsconfig,ioctl", "perl", "-e", PROBE]);
        r.ok();
        // strace pads the result to a column: one space for any run.
        let text = std::fs::read_to_string(&trace).unwrap().split(' ').filter(|w| !w.is_empty()).collect::<Vec<_>>().join(" ");
        std::fs::remove_file(&trace).unwrap();
        for w in want {
            assert!(text.contains(w), "{k}: strace shows no {w:?}:\n{text}");
        }
    }
    // A process forked below the command runs (clone, not clone3).
    let r = under("4.18", &["strace", "-f", "-qq", "-o", t, "-e", "trace=clone3,clone", "sh", "-c", "env true && echo spawned"]);
    r.ok();
    assert_eq!(r.stdout.trim(), "spawned");
    let _ = std::fs::remove_file(&trace);
}

/// sharedloop's own probes, under each surface, find the table of
/// tests/common (status --json's `kernel`), and the release is the fake.
#[test]
fn sharedloop_finds_what_each_surface_offers() {
    if skip_under_a_surface() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("sl-surface-store-{}", std::process::id()));
    let (root, fb) = (dir.join("root"), dir.join("fallback"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&fb).unwrap();
    for (k, rel) in [(None, None), (Some("4.18"), Some("4.18.0-553.el8_10.x86_64")), (Some("5.14"), Some("5.14.0-503.el9.x86_64"))] {
        let argv = [BIN, "status", "--json", "--loopback-root", s(&root), "--loopback-fallback", s(&fb)];
        let r = match k {
            Some(k) => under(k, &argv),
            None => run({
                let mut c = Command::new(BIN);
                c.args(&argv[1..]);
                c
            }),
        };
        r.ok();
        let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
        if let Some(rel) = rel {
            assert_eq!(v["kernel"]["release"], rel, "{k:?}");
        }
        Features::of(k).assert_json(&v["kernel"]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
