//! systemd integration, checked with systemd's own programs:
//! - every fstab.d example, with its paths moved under a temporary
//!   directory, goes through the real systemd-fstab-generator; the generated
//!   unit is checked, passes `systemd-analyze verify`, and `systemd --test`
//!   (the real manager in test mode, run as nobody since it refuses root)
//!   shows the dependencies it really gets, including the implicit ones
//!   `_netdev` and `nofail` stand for;
//! - packaging/srv-containers-debian.mount verifies, gets the same
//!   dependencies, and `systemctl --root` can enable it;
//! - packaging/tmpfiles.d/sharedloop.conf creates /run/sharedloop 0700.
//!
//! Nothing here touches the host's /etc/fstab, units or /run.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

const MANIFEST: &str = env!("CARGO_MANIFEST_DIR");
const GENERATOR: &str = "/lib/systemd/system-generators/systemd-fstab-generator";
const SYSTEMD: &str = "/lib/systemd/systemd";
const SAMPLE_UNIT: &str = "srv-containers-debian.mount";

static SEQ: AtomicU32 = AtomicU32::new(0);

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("sl-systemd-{name}-{}-{}", std::process::id(), SEQ.fetch_add(1, Ordering::SeqCst)));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn need(path: &str) {
    assert!(Path::new(path).exists(), "{path} not found: install the Debian package systemd (scripts/install-deps.sh does)");
}

fn output_text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// One fstab line.
#[derive(Clone, Debug)]
struct Entry {
    source: String,
    target: String,
    fstype: String,
    options: String,
}

impl Entry {
    fn line(&self) -> String {
        format!("{}  {}  {}  {}  0 0\n", self.source, self.target, self.fstype, self.options)
    }

    fn value(&self, key: &str) -> Option<&str> {
        self.options.split(',').find_map(|o| o.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    }
}

/// The examples: file name -> its entries (comments skipped).
fn examples() -> BTreeMap<String, Vec<Entry>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(Path::new(MANIFEST).join("fstab.d")).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".fstab") {
            continue;
        }
        let text = std::fs::read_to_string(e.path()).unwrap();
        let entries: Vec<Entry> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                assert_eq!(f.len(), 6, "{name}: an fstab line has 6 fields: {l}");
                Entry { source: f[0].into(), target: f[1].into(), fstype: f[2].into(), options: f[3].into() }
            })
            .collect();
        assert!(!entries.is_empty(), "{name} has no entry");
        out.insert(name, entries);
    }
    out
}

/// The same entry with every absolute path (the mount point and each
/// option value that is one) moved under `root`.
fn rebase(e: &Entry, root: &Path) -> Entry {
    let r = |p: &str| format!("{}{}", root.display(), p);
    let options = e
        .options
        .split(',')
        .map(|o| match o.split_once('=') {
            Some((k, v)) if v.starts_with('/') => format!("{k}={}", r(v)),
            _ => o.to_string(),
        })
        .collect::<Vec<_>>()
        .join(",");
    Entry { source: e.source.clone(), target: r(&e.target), fstype: e.fstype.clone(), options }
}

fn unit_name(target: &str) -> String {
    let o = Command::new("systemd-escape").args(["--path", "--suffix=mount", target]).output().expect("run systemd-escape");
    assert!(o.status.success(), "{}", output_text(&o));
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// `key=value` lines of a unit file, in order.
fn unit_keys(unit: &str) -> Vec<(String, String)> {
    unit.lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())))
        .collect()
}

fn key<'a>(keys: &'a [(String, String)], k: &str) -> Vec<&'a str> {
    keys.iter().filter(|(a, _)| a == k).map(|(_, v)| v.as_str()).collect()
}

/// `systemd-analyze verify --man=no` on unit files: exit 0 and not a word
/// about them.
#[track_caller]
fn verify(units: &[PathBuf]) {
    need("/usr/bin/systemd-analyze");
    let o = Command::new("systemd-analyze").args(["verify", "--man=no"]).args(units).stdin(Stdio::null()).output().unwrap();
    let out = output_text(&o);
    assert!(o.status.success(), "systemd-analyze verify {units:?}: {:?}\n{out}", o.status);
    for u in units {
        let name = u.file_name().unwrap().to_string_lossy().into_owned();
        for line in out.lines() {
            assert!(!line.contains(&name), "systemd-analyze verify complains: {line}\n{out}");
        }
    }
}

/// The real service manager in test mode (`systemd --test --system`): loads
/// every unit (running the generators, with SYSTEMD_FSTAB honoured), builds
/// the start-up transaction for `unit` and dumps it. Returns the dump of
/// `unit`: "Key: value (origin)" lines.
fn manager_dump(unit: &str, envs: &[(&str, &str)]) -> String {
    need(SYSTEMD);
    // "Don't run test mode as root": as nobody, everything it reads is
    // world-readable (tests' files are 0644/0755).
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", SYSTEMD, "--test", "--system", "--no-pager"])
        .arg(format!("--unit={unit}"))
        .args(["--log-target=console", "--log-level=notice"])
        .env_remove("SYSTEMD_UNIT_PATH")
        .env("SYSTEMD_FSTAB", "/dev/null")
        .env("HOME", "/")
        .stdin(Stdio::null());
    for (k, v) in envs {
        c.env(k, v);
    }
    let o = c.output().expect("run systemd --test");
    let out = output_text(&o);
    assert!(o.status.success(), "systemd --test: {:?}\n{out}", o.status);
    let head = format!("-> Unit {unit}:");
    let start = out.find(&head).unwrap_or_else(|| panic!("{unit} not in the transaction:\n{}", &out[..out.len().min(4000)]));
    let body = &out[start + head.len()..];
    let end = body.find("-> Unit ").unwrap_or(body.len());
    body[..end].to_string()
}

/// "After: network-online.target (origin-mount-file)" -> is it there?
fn dep(dump: &str, kind: &str, unit: &str) -> bool {
    dump.lines().map(str::trim).any(|l| l.starts_with(&format!("{kind}: {unit} ")) || l == format!("{kind}: {unit}"))
}

/// What each example must turn into (the point of each one).
struct Expect {
    /// `_netdev`: a remote mount, after the network, before remote-fs.target.
    remote: bool,
    /// `nofail`: wanted, not required, by its target.
    nofail: bool,
    /// RequiresMountsFor= (the store) from x-systemd.requires-mounts-for=.
    requires_mounts_for: Option<&'static str>,
}

fn expectations() -> BTreeMap<&'static str, Expect> {
    BTreeMap::from([
        ("10-shared-storage.fstab", Expect { remote: true, nofail: true, requires_mounts_for: Some("/mnt/nfs/sharedloop") }),
        ("20-local-store.fstab", Expect { remote: false, nofail: false, requires_mounts_for: None }),
        ("30-read-only.fstab", Expect { remote: false, nofail: false, requires_mounts_for: None }),
        ("40-tmpfs-upper.fstab", Expect { remote: false, nofail: false, requires_mounts_for: None }),
        ("50-persistent-upper.fstab", Expect { remote: false, nofail: false, requires_mounts_for: None }),
    ])
}

#[test]
fn every_fstab_example_has_expectations() {
    let have: Vec<String> = examples().into_keys().collect();
    let want: Vec<String> = expectations().into_keys().map(String::from).collect();
    assert_eq!(have, want, "fstab.d and this test must list the same examples");
}

#[test]
fn fstab_examples_through_systemd_fstab_generator() {
    need(GENERATOR);
    let expect = expectations();
    for (file, entries) in examples() {
        let ex = &expect[file.as_str()];
        for orig in &entries {
            let t = TempDir::new("gen");
            let e = rebase(orig, &t.0);
            // A store directory, as on a real node, for what the entry needs mounted first.
            if let Some(p) = e.value("x-systemd.requires-mounts-for") {
                std::fs::create_dir_all(p).unwrap();
            }
            let fstab = t.0.join("fstab");
            std::fs::write(&fstab, format!("# {file}, paths under {}\n{}", t.0.display(), e.line())).unwrap();
            let (normal, early, late) = (t.0.join("normal"), t.0.join("early"), t.0.join("late"));
            for d in [&normal, &early, &late] {
                std::fs::create_dir_all(d).unwrap();
            }
            let o = Command::new(GENERATOR)
                .args([&normal, &early, &late])
                .env("SYSTEMD_FSTAB", &fstab)
                .env("SYSTEMD_LOG_LEVEL", "debug")
                .env("SYSTEMD_LOG_TARGET", "console")
                .env_remove("SYSTEMD_SYSROOT_FSTAB")
                .stdin(Stdio::null())
                .output()
                .unwrap();
            let log = output_text(&o);
            assert!(o.status.success(), "{file}: generator failed: {log}");
            assert!(
                log.contains(&format!("Found entry what={} where={} type=sharedloop", e.source, e.target)),
                "{file}: generator did not read the entry:\n{log}"
            );
            let name = unit_name(&e.target);
            let path = normal.join(&name);
            let unit = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("{file}: no {name} generated:\n{log}"));
            let keys = unit_keys(&unit);
            assert_eq!(key(&keys, "Type"), ["sharedloop"], "{file}:\n{unit}");
            assert_eq!(key(&keys, "What"), [e.source.as_str()], "{file}:\n{unit}");
            assert_eq!(key(&keys, "Where"), [e.target.as_str()], "{file}:\n{unit}");
            assert_eq!(key(&keys, "Options"), [e.options.as_str()], "{file}: options reach mount(8) as written:\n{unit}");
            assert_eq!(key(&keys, "SourcePath"), [fstab.to_str().unwrap()], "{file}:\n{unit}");
            let rmf: Vec<String> = ex.requires_mounts_for.iter().map(|p| format!("{}{p}", t.0.display())).collect();
            assert_eq!(key(&keys, "RequiresMountsFor"), rmf, "{file}:\n{unit}");
            // nofail -> a Wants (symlink in .wants), otherwise a Requires;
            // _netdev -> remote-fs.target instead of local-fs.target.
            let target = if ex.remote { "remote-fs.target" } else { "local-fs.target" };
            let other = if ex.remote { "local-fs.target" } else { "remote-fs.target" };
            let (rel, not_rel) = if ex.nofail { ("wants", "requires") } else { ("requires", "wants") };
            assert!(normal.join(format!("{target}.{rel}/{name}")).symlink_metadata().is_ok(), "{file}: not in {target}.{rel}");
            for (tg, r) in [(target, not_rel), (other, "wants"), (other, "requires")] {
                assert!(normal.join(format!("{tg}.{r}/{name}")).symlink_metadata().is_err(), "{file}: in {tg}.{r}");
            }
            // Nothing else but this unit (and the generator's usual remount-fs want).
            for d in [&early, &late] {
                assert_eq!(std::fs::read_dir(d).unwrap().count(), 0, "{file}: {} not empty", d.display());
            }

            verify(std::slice::from_ref(&path));

            // What the service manager makes of it, implicit dependencies included.
            let dump = manager_dump(&name, &[("SYSTEMD_FSTAB", fstab.to_str().unwrap())]);
            assert!(dump.contains("File System Type: sharedloop"), "{file}:\n{dump}");
            assert!(dump.contains(&format!("What: {}", e.source)), "{file}:\n{dump}");
            assert_eq!(dep(&dump, "After", "network-online.target"), ex.remote, "{file}: After=network-online.target\n{dump}");
            assert_eq!(dep(&dump, "Wants", "network-online.target"), ex.remote, "{file}: Wants=network-online.target\n{dump}");
            assert_eq!(dep(&dump, "After", "remote-fs-pre.target"), ex.remote, "{file}\n{dump}");
            // nofail also drops the ordering before the target (systemd.mount(5)):
            // boot does not wait for a mount that may never come.
            assert_eq!(dep(&dump, "Before", target), !ex.nofail, "{file}: Before={target}\n{dump}");
            assert!(!dep(&dump, "Before", other), "{file}: Before={other}\n{dump}");
            assert_eq!(dep(&dump, "WantedBy", target), ex.nofail, "{file}: WantedBy={target}\n{dump}");
            assert_eq!(dep(&dump, "RequiredBy", target), !ex.nofail, "{file}: RequiredBy={target}\n{dump}");
            for p in &rmf {
                assert!(dump.contains(&format!("RequiresMountsFor: {p} ")), "{file}: RequiresMountsFor={p}\n{dump}");
            }
        }
    }
}

/// The sample unit's [Unit]/[Mount] keys.
fn sample() -> (String, Vec<(String, String)>) {
    let text = std::fs::read_to_string(Path::new(MANIFEST).join("packaging").join(SAMPLE_UNIT)).unwrap();
    let keys = unit_keys(&text);
    (text, keys)
}

#[test]
fn sample_mount_unit_verifies_and_orders_after_network() {
    let (text, keys) = sample();
    let wheres = key(&keys, "Where");
    assert_eq!(wheres.len(), 1);
    assert_eq!(unit_name(wheres[0]), SAMPLE_UNIT, "the unit name must match Where=");
    assert_eq!(key(&keys, "Type"), ["sharedloop"]);

    let t = TempDir::new("sample");
    let dir = t.0.join("units");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(SAMPLE_UNIT);
    std::fs::write(&path, &text).unwrap();
    verify(&[path]);

    // Loaded by the manager from a unit directory, as an admin installs it.
    let unit_path = format!("{}:", dir.display());
    let dump = manager_dump(SAMPLE_UNIT, &[("SYSTEMD_UNIT_PATH", &unit_path)]);
    assert!(dump.contains(&format!("Fragment Path: {}", dir.join(SAMPLE_UNIT).display())), "{dump}");
    assert!(dump.contains("File System Type: sharedloop"), "{dump}");
    assert!(dep(&dump, "After", "network-online.target"), "{dump}");
    assert!(dep(&dump, "Wants", "network-online.target"), "{dump}");
    assert!(dep(&dump, "Before", "remote-fs.target"), "_netdev makes it a remote mount:\n{dump}");
    assert!(!dep(&dump, "Before", "local-fs.target"), "{dump}");
    let store = key(&keys, "RequiresMountsFor");
    assert_eq!(store.len(), 1);
    assert!(dump.contains(&format!("RequiresMountsFor: {} ", store[0])), "{dump}");

    // [Install] works: systemctl enable in an empty root makes the want.
    let root = t.0.join("root");
    let sys = root.join("etc/systemd/system");
    std::fs::create_dir_all(&sys).unwrap();
    std::fs::write(sys.join(SAMPLE_UNIT), &text).unwrap();
    let o = Command::new("systemctl").arg(format!("--root={}", root.display())).args(["enable", SAMPLE_UNIT]).stdin(Stdio::null()).output().unwrap();
    assert!(o.status.success(), "systemctl --root enable: {}", output_text(&o));
    let link = sys.join("remote-fs.target.wants").join(SAMPLE_UNIT);
    assert!(link.symlink_metadata().is_ok(), "no {}: {}", link.display(), output_text(&o));
}

#[test]
fn sample_mount_unit_matches_the_shared_storage_example() {
    // The unit is the native form of fstab.d/10-shared-storage.fstab: same
    // image, mount point, store and sharedloop options (nofail and x-systemd.*
    // are fstab-only; a unit says them with WantedBy= and RequiresMountsFor=).
    let (_, keys) = sample();
    let ex = &examples()["10-shared-storage.fstab"][0];
    assert_eq!(key(&keys, "What"), [ex.source.as_str()]);
    assert_eq!(key(&keys, "Where"), [ex.target.as_str()]);
    let strip = |o: &str| -> Vec<String> {
        o.split(',').filter(|x| *x != "nofail" && !x.starts_with("x-systemd.")).map(String::from).collect()
    };
    assert_eq!(strip(key(&keys, "Options")[0]), strip(&ex.options));
    assert_eq!(key(&keys, "RequiresMountsFor"), [ex.value("x-systemd.requires-mounts-for").unwrap()]);
    assert!(key(&keys, "WantedBy").contains(&"remote-fs.target"));
}

#[test]
fn tmpfiles_creates_the_state_directory() {
    need("/usr/bin/systemd-tmpfiles");
    let conf = Path::new(MANIFEST).join("packaging/tmpfiles.d/sharedloop.conf");
    // The directory it makes is the helper's default state directory.
    let state_src = std::fs::read_to_string(Path::new(MANIFEST).join("src/mount/state.rs")).unwrap();
    assert!(state_src.contains("\"/run/sharedloop\""), "the state directory moved: update the tmpfiles.d entry");
    let t = TempDir::new("tmpfiles");
    let run = |what: &str| {
        let o = Command::new("systemd-tmpfiles").args(["--create", &format!("--root={}", t.0.display())]).arg(&conf).stdin(Stdio::null()).output().unwrap();
        assert!(o.status.success(), "systemd-tmpfiles ({what}): {}", output_text(&o));
        assert!(output_text(&o).trim().is_empty(), "systemd-tmpfiles ({what}) says: {}", output_text(&o));
    };
    let dir = t.0.join("run/sharedloop");
    let check = |what: &str| {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::symlink_metadata(&dir).unwrap_or_else(|e| panic!("{what}: {}: {e}", dir.display()));
        assert!(md.is_dir(), "{what}");
        assert_eq!(md.mode() & 0o7777, 0o700, "{what}: mode");
        assert_eq!((md.uid(), md.gid()), (0, 0), "{what}: owner");
    };
    run("fresh root");
    check("created");
    // An existing directory with another mode is corrected; contents stay.
    std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::create_dir_all(dir.join("mounts")).unwrap();
    run("again");
    check("corrected");
    assert!(dir.join("mounts").is_dir());
}
