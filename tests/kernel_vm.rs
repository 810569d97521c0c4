//! Kernel matrix (issue 9): the project's own test binaries, run inside a
//! qemu VM (TCG) booted on Debian 12's kernel (linux-image-cloud-amd64,
//! 6.1), by `scripts/kernel-vm.sh`. The VM sees the host's root read-only
//! (so these very binaries and the tools they use), with private /tmp,
//! /run and /dev; the binaries get `SHAREDLOOP_TEST_KERNEL=6.1`.
//!
//! One boot runs a representative subset (whole binaries or named tests,
//! `SUBSET`); `SHAREDLOOP_TEST_VM_FULL=1` runs every mount and import test
//! binary whole (`FULL`) instead. Each inner binary's libtest output is
//! parsed: this test fails naming every inner test that failed, with its
//! output, and fails (never skips) if the VM cannot boot.
//!
//! The inner binaries are the siblings of this one in target/*/deps
//! (`cargo test` builds every test binary before it runs any; after
//! `cargo test --test kernel_vm` alone, run `cargo test --no-run` first).

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime};

/// The kernel the VM boots (the major.minor its release must start with).
const KERNEL: &str = "6.1";

/// Always run: (binary, tests to run with --exact; empty for all of it).
const SUBSET: &[(&str, &[&str])] = &[
    ("mount_basic", &[]),
    ("status", &[]),
    // Layers whose entries refer to lower layers (hardlinks into them,
    // whiteouts, opaque directories), built by umoci and by hand.
    ("import", &["umoci_oci_layout_matches_umoci_unpack", "layer_semantics_through_oci_and_docker_archive"]),
    // One round of failures at every step of a mount, each mount API.
    ("failures", &["steps_with_each_mount_api"]),
    ("hostile_store", &[]),
];

/// With SHAREDLOOP_TEST_VM_FULL=1: these binaries whole.
const FULL: &[&str] = &[
    "mount_basic",
    "mount_features",
    "status",
    "import",
    "failures",
    "hostile_store",
    "manage",
    "hardening",
    "bad_input",
    "build_children",
    "logging",
];

/// Hard limits: one inner binary, and the whole VM (boot included).
const INNER_TIMEOUT_S: u64 = 900;
const VM_TIMEOUT_S: u64 = 1500;
const FULL_VM_TIMEOUT_S: u64 = 4800;
/// Test threads of each inner binary (the VM has 2 CPUs).
const THREADS: u32 = 2;

struct Inner {
    label: String,
    bin: PathBuf,
    tests: Vec<String>,
}

/// One inner binary's outcome, from its libtest output.
#[derive(Debug, Default)]
struct Outcome {
    code: Option<i32>,
    passed: Vec<String>,
    failed: Vec<String>,
    ignored: usize,
    summary: Option<String>,
    secs: Option<f64>,
}

#[test]
fn test_binaries_on_debian_12_kernel() {
    // `make check` runs it on its own, after the suite (`kernel-rounds`),
    // so that the emulated CPU does not slow the other tests down; inside
    // the suite it does nothing unless SHAREDLOOP_TEST_VM=1.
    if std::env::var("SHAREDLOOP_TEST_VM").map_or(true, |v| v != "1") {
        eprintln!("kernel_vm: run by `make check-kernels` (SHAREDLOOP_TEST_VM=1)");
        return;
    }
    let full = std::env::var("SHAREDLOOP_TEST_VM_FULL").is_ok_and(|v| v == "1");
    let exe = std::env::current_exe().unwrap();
    let deps = exe.parent().unwrap().to_path_buf();
    // target/<profile>/deps -> target
    let target = deps.parent().and_then(Path::parent).unwrap().to_path_buf();
    // The library every test binary links: one older than it is stale.
    let lib_built = newest(&deps, |n, _| n.starts_with("libsharedloop-") && n.ends_with(".rlib")).map(|(_, t)| t);

    // SHAREDLOOP_TEST_VM_ONLY=bin[,bin...]: those binaries whole, to look
    // into one failure without the 35 minutes of a full run.
    let only = std::env::var("SHAREDLOOP_TEST_VM_ONLY").unwrap_or_default();
    let only: Vec<&str> = only.split(',').filter(|b| !b.is_empty()).collect();
    for b in &only {
        assert!(FULL.contains(b), "SHAREDLOOP_TEST_VM_ONLY: {b:?} is not one of {FULL:?}");
    }
    let plan: Vec<(&str, Vec<String>)> = if !only.is_empty() {
        only.iter().map(|b| (*b, vec![])).collect()
    } else if full {
        FULL.iter().map(|b| (*b, vec![])).collect()
    } else {
        SUBSET.iter().map(|(b, t)| (*b, t.iter().map(|s| s.to_string()).collect())).collect()
    };
    let mut inners = vec![];
    let mut missing = vec![];
    for (name, tests) in plan {
        let exe_ok = |n: &str, md: &std::fs::Metadata| is_test_binary(n, name) && md.permissions().mode() & 0o111 != 0;
        match newest(&deps, exe_ok) {
            Some((bin, built)) if lib_built.is_none_or(|l| built >= l) => {
                inners.push(Inner { label: name.to_string(), bin, tests });
            }
            Some((bin, _)) => missing.push(format!("{name}: {} is older than the library (stale)", bin.display())),
            None => missing.push(format!("{name}: no test binary in {}", deps.display())),
        }
    }
    assert!(
        missing.is_empty(),
        "inner test binaries missing or stale (build them all: cargo test --no-run):\n  {}",
        missing.join("\n  ")
    );

    // Files of an earlier failed run are kept for a look until the next run.
    let runs = target.join("kernel-vm").join("runs");
    for e in std::fs::read_dir(&runs).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.strip_prefix("kernel_vm-").is_some_and(|pid| !Path::new("/proc").join(pid).exists()) {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
    let scratch = runs.join(format!("kernel_vm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    std::fs::write(scratch.join("inner.sh"), runner_script(&scratch, &inners)).unwrap();

    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kernel-vm.sh");
    let mut c = Command::new("bash");
    c.arg(&script)
        .args(["--timeout", &(if full || !only.is_empty() { FULL_VM_TIMEOUT_S } else { VM_TIMEOUT_S }).to_string()])
        .args(["--mem", "6144", "--tmp-size", "4096", "--cpus", "2", "--quiet"])
        .arg("--scratch")
        .arg(&scratch)
        .args(["--env", &format!("SHAREDLOOP_TEST_KERNEL={KERNEL}")]);
    // The host's test switches go in too (SHAREDLOOP_TEST_ALL_KILLS, ...).
    for (k, v) in std::env::vars() {
        if k.starts_with("SHAREDLOOP_TEST_") && k != "SHAREDLOOP_TEST_KERNEL" && k != "SHAREDLOOP_TEST_VM_FULL" && k != "SHAREDLOOP_TEST_VM_ONLY" {
            c.args(["--env", &format!("{k}={v}")]);
        }
    }
    c.args(["--", "sh"]).arg(scratch.join("inner.sh"));
    c.env("CARGO_TARGET_DIR", &target);
    c.current_dir(env!("CARGO_MANIFEST_DIR"));
    c.stdin(std::process::Stdio::null());
    sharedloop::kernel::sys::die_with_parent(&mut c);
    let t0 = Instant::now();
    let out = c.output().expect("run scripts/kernel-vm.sh");
    let wall = t0.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "the {KERNEL} VM did not run the inner tests to the end (kernel-vm.sh: {}, after {wall:.0}s):\n\
         --- stdout:\n{stdout}\n--- stderr:\n{stderr}\n--- files kept in {}",
        out.status,
        scratch.display()
    );

    let version = std::fs::read_to_string(scratch.join("kernel-version")).unwrap_or_default();
    let release = version.split_whitespace().nth(2).unwrap_or("");
    assert!(
        release.starts_with(&format!("{KERNEL}.")),
        "the VM ran kernel {release:?}, not {KERNEL}: {version}"
    );
    let boot = read_f64(&scratch.join("boot"));

    let mut report = String::new();
    let _ = writeln!(report, "{}", version.trim());
    let _ = writeln!(
        report,
        "VM: {wall:.0}s wall in all, inner tests started {:.0}s after boot ({}):",
        boot.unwrap_or(f64::NAN),
        if full { "full run" } else { "subset; SHAREDLOOP_TEST_VM_FULL=1 runs all" }
    );
    let mut problems = String::new();
    for i in &inners {
        let text = std::fs::read_to_string(scratch.join(format!("{}.out", i.label))).unwrap_or_default();
        let mut o = parse_libtest(&text);
        o.code = std::fs::read_to_string(scratch.join(format!("{}.rc", i.label))).ok().and_then(|s| s.trim().parse().ok());
        o.secs = std::fs::read_to_string(scratch.join(format!("{}.time", i.label))).ok().and_then(|s| {
            let v: Vec<f64> = s.split_whitespace().filter_map(|x| x.parse().ok()).collect();
            (v.len() == 2).then(|| v[1] - v[0])
        });
        let what = if i.tests.is_empty() { "all".to_string() } else { i.tests.join(" ") };
        let _ = writeln!(
            report,
            "  {:<14} {:>6.1}s  {} passed, {} failed, {} ignored, exit {}  [{what}]",
            i.bin.file_name().unwrap().to_string_lossy().split('-').next().unwrap(),
            o.secs.unwrap_or(f64::NAN),
            o.passed.len(),
            o.failed.len(),
            o.ignored,
            o.code.map_or("?".into(), |c| c.to_string()),
        );
        check_outcome(i, &o, &text, &mut problems);
    }
    println!("{report}");
    if !problems.is_empty() {
        panic!(
            "inner tests failed on kernel {release}:\n{report}\n{problems}\n(VM files kept in {})",
            scratch.display()
        );
    }
    let _ = std::fs::remove_dir_all(&scratch);
}

/// The shell script the VM runs: each inner binary in turn, its output,
/// exit status and start/end uptime into the scratch directory.
fn runner_script(scratch: &Path, inners: &[Inner]) -> String {
    let s = scratch.display();
    let mut sh = format!(
        "#!/bin/sh\n# Written by tests/kernel_vm.rs; run inside the VM.\n\
         up() {{ cut -d' ' -f1 /proc/uptime; }}\nup >{s}/boot\n"
    );
    for i in inners {
        let mut args = format!("--test-threads={THREADS}");
        if !i.tests.is_empty() {
            args.push_str(" --exact");
            for t in &i.tests {
                args.push(' ');
                args.push_str(t);
            }
        }
        let _ = write!(
            sh,
            "b=$(up); timeout -k 10 {INNER_TIMEOUT_S} {bin} {args} >{s}/{l}.out 2>&1; echo $? >{s}/{l}.rc; echo \"$b $(up)\" >{s}/{l}.time\n",
            bin = i.bin.display(),
            l = i.label,
        );
    }
    sh
}

/// Test names, counts and the summary line of libtest's default output.
fn parse_libtest(text: &str) -> Outcome {
    let mut o = Outcome::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("test ") {
            if let Some((name, result)) = rest.rsplit_once(" ... ") {
                match result.trim() {
                    "ok" => o.passed.push(name.to_string()),
                    "FAILED" => o.failed.push(name.to_string()),
                    r if r.starts_with("ignored") => o.ignored += 1,
                    _ => {}
                }
            }
        }
        if line.starts_with("test result: ") {
            o.summary = Some(line.to_string());
        }
    }
    o
}

/// An inner failure's own output: its "---- NAME stdout ----" section.
fn failure_section(text: &str, name: &str) -> String {
    let head = format!("---- {name} stdout ----");
    let Some(start) = text.find(&head) else { return String::new() };
    let body = &text[start + head.len()..];
    let end = [body.find("\n---- "), body.find("\nfailures:\n")].into_iter().flatten().min().unwrap_or(body.len());
    // Without a backtrace; a long message by its start and its end.
    let lines: Vec<&str> = body[..end]
        .trim()
        .lines()
        .take_while(|l| !l.starts_with("stack backtrace:") && !l.starts_with("note: run with `RUST_BACKTRACE"))
        .collect();
    if lines.len() <= 40 {
        return lines.join("\n");
    }
    format!("{}\n[... {} lines ...]\n{}", lines[..12].join("\n"), lines.len() - 37, lines[lines.len() - 25..].join("\n"))
}

fn check_outcome(i: &Inner, o: &Outcome, text: &str, problems: &mut String) {
    let tail = || {
        let l: Vec<&str> = text.lines().collect();
        l[l.len().saturating_sub(40)..].join("\n")
    };
    let Some(summary) = &o.summary else {
        let _ = writeln!(
            problems,
            "=== {}: no libtest summary (exit {:?}; 124 is the inner timeout of {INNER_TIMEOUT_S}s); last lines:\n{}\n",
            i.label,
            o.code,
            tail()
        );
        return;
    };
    for f in &o.failed {
        let _ = writeln!(problems, "=== {} :: {f} FAILED\n{}\n", i.label, failure_section(text, f));
    }
    // Every named test ran (a renamed one would otherwise run nothing).
    let ran: Vec<&String> = o.passed.iter().chain(&o.failed).collect();
    for t in &i.tests {
        if !ran.iter().any(|r| *r == t) {
            let _ = writeln!(problems, "=== {} :: {t} did not run (renamed? ignored?): {summary}\n", i.label);
        }
    }
    if i.tests.is_empty() && ran.is_empty() {
        let _ = writeln!(problems, "=== {}: ran no test: {summary}\n", i.label);
    }
    let want_code = if o.failed.is_empty() { 0 } else { 101 };
    if o.code != Some(want_code) || (o.failed.is_empty() != summary.starts_with("test result: ok.")) {
        let _ = writeln!(problems, "=== {}: exit {:?}, summary {summary:?}; last lines:\n{}\n", i.label, o.code, tail());
    }
}

/// `NAME-<16 hex digits>`, cargo's name for a test binary (no .d, .rlib ...).
fn is_test_binary(file: &str, name: &str) -> bool {
    file.strip_prefix(name)
        .and_then(|r| r.strip_prefix('-'))
        .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The newest regular file in `dir` whose name and metadata `ok` accepts,
/// with its modification time.
fn newest(dir: &Path, ok: impl Fn(&str, &std::fs::Metadata) -> bool) -> Option<(PathBuf, SystemTime)> {
    let mut best: Option<(PathBuf, SystemTime)> = None;
    for e in std::fs::read_dir(dir).ok()?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(md) = e.metadata() else { continue };
        if !md.is_file() || !ok(&name, &md) {
            continue;
        }
        let Ok(t) = md.modified() else { continue };
        if best.as_ref().is_none_or(|(_, bt)| t > *bt) {
            best = Some((e.path(), t));
        }
    }
    best
}

fn read_f64(p: &Path) -> Option<f64> {
    std::fs::read_to_string(p).ok()?.trim().parse().ok()
}
