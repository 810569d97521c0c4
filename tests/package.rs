//! Distribution: man pages, shell completions, the Debian package and the
//! RPM spec.
//!
//! The Debian package is built with `make deb`, its contents are checked
//! file by file, and it is installed for real with `dpkg --root` into a
//! private root with a fresh dpkg database (maintainer scripts run
//! chrootless, with DPKG_ROOT set, as for any package installed with
//! --root). Then, in a private mount namespace where the installed
//! /usr/bin and /sbin are overlaid on the host's (so the files are used
//! exactly as dpkg laid them out, the absolute link
//! /sbin/mount.sharedloop -> /usr/bin/sharedloop included), an image is
//! built with the installed `sharedloop add` and mounted twice: by running
//! /sbin/mount.sharedloop directly and through mount(8)/umount(8). Every
//! mount and loop device is checked gone, and `dpkg -r`/`dpkg -P` must
//! leave nothing of the package (the conffile only until the purge).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use common::{E, loops_under, make_tree, wait_no_loops};

/// One `make` at a time in this test binary: both packages build the same
/// release binary and may run the dependency script (apt-get).
static MAKE: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn out_str(o: &Output) -> String {
    format!("status {:?}\nstdout:\n{}\nstderr:\n{}", o.status, String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

#[track_caller]
fn ok(c: &mut Command) -> String {
    let o = c.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{c:?}: {e}"));
    assert!(o.status.success(), "{c:?} failed: {}", out_str(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn have(prog: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {prog}")]).stdout(Stdio::null()).status().is_ok_and(|s| s.success())
}

/// `make TARGET` in the repository, with this run's CARGO_TARGET_DIR.
#[track_caller]
fn make(target: &str) {
    let _g = MAKE.lock().unwrap_or_else(|e| e.into_inner());
    let o = Command::new("make")
        .arg("--no-print-directory")
        .arg(target)
        .current_dir(repo())
        // Not the jobserver of an outer `make check`.
        .env_remove("MAKEFLAGS")
        .env_remove("MFLAGS")
        .env_remove("MAKELEVEL")
        .stdin(Stdio::null())
        .output()
        .expect("run make");
    assert!(o.status.success(), "make {target} failed: {}", out_str(&o));
}

fn version() -> String {
    let t = std::fs::read_to_string(repo().join("Cargo.toml")).unwrap();
    let pkg = t.split("[package]").nth(1).unwrap();
    pkg.lines()
        .find_map(|l| l.trim().strip_prefix("version").map(|v| v.trim().trim_start_matches('=').trim().trim_matches('"').to_string()))
        .expect("version in Cargo.toml")
}

fn files_in(dir: &str, suffix: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(repo().join(dir))
        .map(|r| r.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).filter(|n| n.ends_with(suffix)).collect())
        .unwrap_or_default();
    v.sort();
    v
}

const MAN_PAGES: [&str; 4] = ["man/mount.sharedloop.8", "man/umount.sharedloop.8", "man/sharedloop.8", "man/sharedloop.conf.5"];

/// The text of a troff source with the escapes that matter for searching
/// undone: `\-` is '-', font changes and `\&` go.
fn troff_text(src: &str) -> String {
    let mut s = src.replace("\\-", "-").replace("\\&", "").replace("\\(dq", "\"").replace("\\(aq", "'").replace("\\e", "\\");
    for f in ["\\fB", "\\fI", "\\fR", "\\fP"] {
        s = s.replace(f, "");
    }
    s
}

/// `word` occurs in `text` with no letter, digit, '_' or '-' right before
/// or after it.
fn has_word(text: &str, word: &str) -> bool {
    let is_w = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_w) && !after.is_some_and(is_w)
    })
}

/// Every string literal in the lines of `src` between the first line
/// containing `from` and the next line containing `to`.
fn literals_between(src: &str, from: &str, to: &str) -> Vec<String> {
    let mut out = vec![];
    let mut on = false;
    for l in src.lines() {
        if !on {
            on = l.contains(from);
            if !on {
                continue;
            }
        } else if l.contains(to) {
            break;
        }
        let code = l.split("//").next().unwrap_or("");
        // Between the quotes: every other piece.
        for (i, lit) in code.split('"').enumerate() {
            if i % 2 == 1 && !lit.is_empty() && lit.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                out.push(lit.to_string());
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

// ------------------------------------------------------------- man pages

#[test]
fn man_pages_render_without_warnings() {
    for page in MAN_PAGES {
        let path = repo().join(page);
        assert!(path.is_file(), "{page} missing");
        // groff's own checks: every warning enabled.
        let o = Command::new("groff").args(["-man", "-ww", "-z"]).arg(&path).output().expect("groff");
        assert!(o.status.success() && o.stderr.is_empty(), "groff -ww {page}: {}", out_str(&o));
        // man(1) as a user runs it, with its warnings.
        let o = Command::new("man").args(["--warnings", "-l"]).arg(&path).env("MANWIDTH", "80").env_remove("MAN_KEEP_FORMATTING").output().expect("man");
        assert!(o.status.success() && o.stderr.is_empty(), "man --warnings -l {page}: {}", out_str(&o));
        let text = String::from_utf8_lossy(&o.stdout);
        for section in ["NAME", "SYNOPSIS", "DESCRIPTION", "SEE ALSO"] {
            assert!(text.lines().any(|l| l == section), "{page}: no {section} section");
        }
        let src = std::fs::read_to_string(&path).unwrap();
        assert!(!src.contains("TODO") && !src.contains("FIXME"), "{page}: unfinished");
        assert!(src.contains(&format!("\"sharedloop {}\"", version())), "{page}: .TH does not carry version {}", version());
    }
}

#[test]
fn mount_man_page_documents_every_option_and_variable() {
    let page = troff_text(&std::fs::read_to_string(repo().join("man/mount.sharedloop.8")).unwrap());
    let opts = std::fs::read_to_string(repo().join("src/mount/opts.rs")).unwrap();
    // Every key the option parser matches, and mount(8)'s own.
    let mut keys = literals_between(&opts, "match key.as_str() {", "k if is_userspace(k)");
    keys.extend(literals_between(&opts, "fn is_userspace", "starts_with(\"x-\")"));
    assert!(keys.len() > 40 && keys.iter().any(|k| k == "loopback_root") && keys.iter().any(|k| k == "_netdev"), "parser keys not found: {keys:?}");
    let missing: Vec<&String> = keys.iter().filter(|k| !has_word(&page, k)).collect();
    assert!(missing.is_empty(), "mount.sharedloop.8 does not document {missing:?}");
    // The helpers' flags, as src/cli/argv.rs scans them: scan(args, b"FLAGS", b"VALUED").
    let argv = std::fs::read_to_string(repo().join("src/cli/argv.rs")).unwrap();
    let scans: Vec<String> = argv
        .lines()
        .filter(|l| l.contains("scan(args, b\""))
        .map(|l| l.split('"').skip(1).step_by(2).take(2).collect::<String>())
        .collect();
    assert_eq!(scans.len(), 2, "scan() calls in src/cli/argv.rs: {scans:?}");
    let umount_page = troff_text(&std::fs::read_to_string(repo().join("man/umount.sharedloop.8")).unwrap());
    for (flags, text, name) in [(&scans[0], &page, "mount.sharedloop.8"), (&scans[1], &umount_page, "umount.sharedloop.8")] {
        for c in flags.chars() {
            let f = format!("-{c}");
            let entry = text.lines().any(|l| {
                (l.starts_with(".B") || l.starts_with(".BR") || l.starts_with(".BI"))
                    && l.split([' ', '"', ',']).any(|w| w == f)
            });
            assert!(entry, "{name}: no entry for {f}");
        }
    }
    // Exit codes.
    for code in [0, 1, 2, 4, 8, 16, 32] {
        assert!(page.contains(&format!(".B {code}\n")), "mount.sharedloop.8: exit status {code}");
    }
    // Every SHAREDLOOP_* / LIBMOUNT_* variable the code reads by name.
    let mut vars = BTreeSet::new();
    let mut dirs = vec![repo().join("src")];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
                continue;
            }
            let Ok(s) = std::fs::read_to_string(e.path()) else { continue };
            for part in s.split("env::var").skip(1) {
                let lit = part.split('"').nth(1).unwrap_or("");
                if lit.starts_with("SHAREDLOOP_") || lit.starts_with("LIBMOUNT_") {
                    vars.insert(lit.to_string());
                }
            }
        }
    }
    for v in ["SHAREDLOOP_CONFIG", "SHAREDLOOP_STATE_DIR", "SHAREDLOOP_DEBUG", "LIBMOUNT_UTAB"] {
        assert!(vars.contains(v), "{v} no longer read by the code? {vars:?}");
    }
    let missing: Vec<&String> = vars.iter().filter(|v| !page.contains(&format!(".B {v}\n"))).collect();
    assert!(missing.is_empty(), "mount.sharedloop.8 ENVIRONMENT lacks {missing:?}");

    // The configuration file's keys, in sharedloop.conf(5).
    let conf = troff_text(&std::fs::read_to_string(repo().join("man/sharedloop.conf.5")).unwrap());
    let cfg_keys = literals_between(&opts, "let config_ok = matches!(", ");");
    assert!(cfg_keys.len() >= 10, "config keys not found: {cfg_keys:?}");
    let missing: Vec<&String> = cfg_keys.iter().filter(|k| !has_word(&conf, k)).collect();
    assert!(missing.is_empty(), "sharedloop.conf.5 does not document {missing:?}");
    // And the shipped configuration file names only keys the parser takes.
    let shipped = std::fs::read_to_string(repo().join("packaging/sharedloop.conf")).unwrap();
    for l in shipped.lines() {
        let l = l.trim_start_matches('#');
        if let Some((k, _)) = l.split_once('=')
            && !k.contains(' ')
        {
            assert!(cfg_keys.iter().any(|c| c == k), "packaging/sharedloop.conf: {k} is not a configuration key");
        }
    }
}

/// (subcommands, their long and short options) from the CLI's own --help.
fn cli_surface() -> BTreeMap<String, BTreeSet<String>> {
    let help = |args: &[&str]| ok(Command::new(common::BIN).args(args));
    let top = help(&["--help"]);
    let mut cmds = vec![];
    let mut in_cmds = false;
    for l in top.lines() {
        if l.starts_with("Commands:") {
            in_cmds = true;
            continue;
        }
        if in_cmds {
            if l.trim().is_empty() {
                break;
            }
            let name = l.split_whitespace().next().unwrap().to_string();
            if name != "help" {
                cmds.push(name);
            }
        }
    }
    assert!(cmds.iter().any(|c| c == "add"), "no commands in --help: {top}");
    let opts_of = |text: &str| -> BTreeSet<String> {
        let mut s = BTreeSet::new();
        for l in text.lines() {
            let t = l.trim_start();
            if !t.starts_with('-') {
                continue;
            }
            for w in t.split([',', ' ']).filter(|w| w.starts_with('-')) {
                // `--tls-verify[=<BOOL>]`: an option with an optional value.
                s.insert(w.split(['[', '=']).next().unwrap_or(w).to_string());
            }
        }
        s
    };
    let mut out = BTreeMap::new();
    out.insert(String::new(), opts_of(&top));
    for c in cmds {
        let h = help(&[&c, "--help"]);
        out.insert(c, opts_of(&h));
    }
    out
}

#[test]
fn admin_man_page_and_completions_cover_the_cli() {
    let page = troff_text(&std::fs::read_to_string(repo().join("man/sharedloop.8")).unwrap());
    let bash = std::fs::read_to_string(repo().join("completions/sharedloop.bash")).unwrap();
    let zsh = std::fs::read_to_string(repo().join("completions/_sharedloop")).unwrap();
    let surface = cli_surface();
    // The commands the issue promised, whether or not built yet.
    for c in ["add", "import", "ls", "rm", "gc", "verify", "status", "mounts"] {
        assert!(page.contains(&format!(".SS \"{c} ")), "sharedloop.8: no section for {c}");
        assert!(page.contains(&format!(".B {c}\n")), "sharedloop.8: {c} not in the synopsis");
    }
    for (cmd, opts) in &surface {
        let where_ = if cmd.is_empty() { "sharedloop".to_string() } else { format!("sharedloop {cmd}") };
        if !cmd.is_empty() {
            assert!(page.contains(&format!(".SS \"{cmd}")), "sharedloop.8: no section for {where_}");
            assert!(has_word(&bash, cmd), "sharedloop.bash: no {where_}");
            assert!(zsh.contains(&format!("'{cmd}:")), "_sharedloop: no {where_}");
        }
        for o in opts {
            assert!(has_word(&page, o), "sharedloop.8: {where_} {o} undocumented");
            if o != "-h" && o != "--help" && o != "-V" && o != "--version" || cmd.is_empty() {
                assert!(has_word(&bash, o), "sharedloop.bash: {where_} {o} missing");
                assert!(zsh.contains(o.as_str()), "_sharedloop: {where_} {o} missing");
            }
        }
    }
}

// ------------------------------------------------------------ completions

/// A directory removed when dropped (panics included: it holds no mounts).
struct Fixture(PathBuf);

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A small store for name completion: names in the root and the fallback
/// ('/' as %2F), a dot file that is not a name, and a config naming them.
fn completion_fixture(tag: &str) -> Fixture {
    let d = std::env::temp_dir().join(format!("sl-pkg-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    for p in ["root/names", "fb/names", "src/layerdir", "src/ocidir", "fb2/names"] {
        std::fs::create_dir_all(d.join(p)).unwrap();
    }
    for f in ["root/names/debian:12", "root/names/.debian:12.123.x", "fb/names/library%2Fbusybox:1.36", "fb2/names/other:1", "src/img.tar"] {
        std::fs::write(d.join(f), "sha256:0000\n").unwrap();
    }
    std::fs::write(
        d.join("sharedloop.conf"),
        format!("# test\n  loopback_root={}/root   # the root\nloopback_fallback=\"{}/fb\"\n", d.display(), d.display()),
    )
    .unwrap();
    Fixture(d)
}

#[test]
fn bash_completion() {
    let file = repo().join("completions/sharedloop.bash");
    ok(Command::new("bash").arg("-n").arg(&file));
    let fixture = completion_fixture("bash");
    let d = &fixture.0;
    let ds = d.display().to_string();
    let all_cmds: Vec<String> = cli_surface().keys().filter(|k| !k.is_empty()).cloned().collect();
    // (line, COMP_WORDBREAKS without ':'?, expected COMPREPLY)
    let cmds_str = {
        let mut v = all_cmds.clone();
        v.push("help".into());
        v
    };
    let cases: Vec<(String, bool, Vec<String>)> = vec![
        ("sharedloop i".into(), false, vec!["import".into()]),
        ("sharedloop st".into(), false, vec!["status".into()]),
        ("sharedloop --loopback-r".into(), false, vec!["--loopback-root".into()]),
        ("sharedloop add --f".into(), false, vec!["--fstype".into()]),
        ("sharedloop add --fstype e".into(), false, vec!["ext4".into(), "erofs".into()]),
        ("sharedloop import --fstype=x".into(), false, vec!["xfs".into()]),
        ("sharedloop gc --".into(), false, vec![
            "--dry-run".into(), "--min-age".into(), "--json".into(), "--loopback-root".into(), "--loopback-fallback".into(), "--verbose".into(), "--help".into(),
        ]),
        ("sharedloop rm deb".into(), false, vec!["debian:12".into()]),
        ("sharedloop ls deb".into(), false, vec!["debian:12".into()]),
        ("sharedloop ls debian:12 ".into(), false, vec![]),
        // readline replaces only what follows the last ':' ...
        ("sharedloop rm debian:".into(), false, vec!["12".into()]),
        // ... unless ':' does not break words.
        ("sharedloop rm debian:".into(), true, vec!["debian:12".into()]),
        ("sharedloop verify debian:12 lib".into(), false, vec!["library/busybox:1.36".into()]),
        ("sharedloop add --parent ".into(), false, vec!["debian:12".into(), "library/busybox:1.36".into()]),
        (format!("sharedloop --loopback-root {ds}/fb2 rm "), false, vec!["library/busybox:1.36".into(), "other:1".into()]),
        (format!("sharedloop rm --loopback-fallback={ds}/fb2 "), false, vec!["debian:12".into(), "other:1".into()]),
        ("sharedloop import ".into(), false, vec!["oci:".into(), "oci-archive:".into(), "docker-archive:".into(), "docker://".into()]),
        ("sharedloop import d".into(), false, vec!["docker-archive:".into(), "docker://".into()]),
        ("sharedloop import docker:/".into(), true, vec!["docker://".into()]),
        ("sharedloop import --pl".into(), false, vec!["--platform".into()]),
        ("sharedloop import --platform linux/arm".into(), false, vec!["linux/arm64".into(), "linux/arm/v7".into()]),
        ("sharedloop import --tls-verify=f".into(), false, vec!["false".into()]),
        (format!("sharedloop import oci:{ds}/src/oc"), false, vec![format!("{ds}/src/ocidir")]),
        (format!("sharedloop import docker-archive:{ds}/src/im"), true, vec![format!("docker-archive:{ds}/src/img.tar")]),
        (format!("sharedloop add {ds}/src/la"), false, vec![format!("{ds}/src/layerdir")]),
        (format!("sharedloop --loopback-root {ds}/r"), false, vec![format!("{ds}/root")]),
        ("sharedloop help v".into(), false, vec!["verify".into()]),
        ("sharedloop ".into(), false, cmds_str.clone()),
    ];
    let mut script = format!("set -u\nsource {}\n", file.display());
    script.push_str(
        "t() { COMP_LINE=$1; COMP_POINT=${#1}; COMPREPLY=(); _sharedloop; local IFS=$'\\x1f'; printf '%s\\n' \"${COMPREPLY[*]}\"; }\n",
    );
    for (line, nocolon, _) in &cases {
        let wb = if *nocolon { "COMP_WORDBREAKS=$' \\t\\n\"\\'><=;|&('" } else { "COMP_WORDBREAKS=$' \\t\\n\"\\'><=;|&(:'" };
        script.push_str(&format!("{wb}; t '{line}'\n"));
    }
    // The registration.
    script.push_str("complete -p sharedloop\n");
    let out = ok(Command::new("bash").args(["--norc", "--noprofile", "-c", &script]).env("SHAREDLOOP_CONFIG", d.join("sharedloop.conf")));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), cases.len() + 1, "{out}");
    for ((line, nocolon, want), got) in cases.iter().zip(&lines) {
        let got: Vec<&str> = if got.is_empty() { vec![] } else { got.split('\x1f').collect() };
        let mut g: Vec<&str> = got.clone();
        let mut w: Vec<&str> = want.iter().map(|s| s.as_str()).collect();
        g.sort();
        w.sort();
        assert_eq!(g, w, "completing {line:?} (':' breaks words: {})", !nocolon);
    }
    assert_eq!(lines[cases.len()], "complete -F _sharedloop sharedloop");
    // Every command's options, after the command.
    for (cmd, opts) in cli_surface() {
        if cmd.is_empty() {
            continue;
        }
        let s = format!("source {}\nCOMP_LINE='sharedloop {cmd} -'; COMP_POINT=${{#COMP_LINE}}; _sharedloop; printf '%s\\n' \"${{COMPREPLY[@]}}\"\n", file.display());
        let out = ok(Command::new("bash").args(["--norc", "--noprofile", "-c", &s]));
        let got: BTreeSet<&str> = out.lines().collect();
        for o in opts.iter().filter(|o| *o != "-V" && *o != "--version") {
            assert!(got.contains(o.as_str()), "sharedloop {cmd} -<TAB> lacks {o}: {got:?}");
        }
    }
}

/// The completion as a user gets it: installed by `make install` (default
/// PREFIX, in a private mount namespace where the DESTDIR tree lies over
/// /usr/local), and an interactive bash started with Debian's own
/// ~/.bashrc (/etc/skel), which loads bash-completion; pressing TAB is
/// what readline does: the default completion (bash-completion's loader)
/// finds and sources our file, then our function answers.
#[test]
fn bash_completion_in_a_users_shell() {
    if !Path::new("/usr/share/bash-completion/bash_completion").exists() {
        make("deps");
    }
    let d = std::env::temp_dir().join(format!("sl-pkg-bashrc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    let fixture = Fixture(d.clone());
    let dest = d.join("dest");
    let home = d.join("home");
    std::fs::create_dir_all(&home).unwrap();
    std::fs::copy("/etc/skel/.bashrc", home.join(".bashrc")).unwrap();
    {
        let _g = MAKE.lock().unwrap_or_else(|e| e.into_inner());
        ok(Command::new("make")
            .args(["--no-print-directory", "install-files"])
            .arg(format!("DESTDIR={}", dest.display()))
            .arg(format!("BIN={}", common::BIN))
            .current_dir(repo())
            .env_remove("MAKEFLAGS")
            .env_remove("MFLAGS")
            .env_remove("MAKELEVEL"));
    }
    // Where the default PREFIX puts it, and where bash-completion looks
    // (XDG_DATA_DIRS defaults to /usr/local/share:/usr/share).
    assert!(dest.join("usr/local/share/bash-completion/completions/sharedloop").is_file());
    let tab = r#"
complete -p sharedloop >/dev/null 2>&1 && echo "registered before any TAB"
read -r _ _ loader _ <<<"$(complete -p -D)"
"$loader" sharedloop st sharedloop
echo "loader=$?"
complete -p sharedloop
COMP_LINE='sharedloop st'; COMP_POINT=${#COMP_LINE}; COMPREPLY=()
_sharedloop sharedloop st sharedloop
printf 'reply=%s
' "${COMPREPLY[@]}"
"#;
    let script = format!(
        "set -e; mount --bind {} /usr/local; cd {}; exec env -i HOME={} TERM=dumb PATH=/usr/local/bin:/usr/bin:/bin bash -i",
        dest.join("usr/local").display(),
        home.display(),
        home.display()
    );
    let mut c = Command::new("unshare");
    c.args(["-m", "--propagation", "private", "--", "sh", "-c", &script]).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = c.spawn().unwrap();
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), tab.as_bytes()).unwrap();
    let o = child.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(out, "loader=124\ncomplete -F _sharedloop sharedloop\nreply=status\n", "{}", out_str(&o));
    drop(fixture);
}

#[test]
fn zsh_completion() {
    if !have("zsh") {
        make("deps");
    }
    let file = repo().join("completions/_sharedloop");
    ok(Command::new("zsh").arg("-n").arg(&file));
    assert!(std::fs::read_to_string(&file).unwrap().starts_with("#compdef sharedloop\n"));
    let fixture = completion_fixture("zsh");
    let d = &fixture.0;
    let ds = d.display().to_string();
    // An interactive zsh on a pseudo-terminal (zpty): type a line and TAB,
    // read back what the line became (and the listing, if any).
    // Each TAB is followed by ^U and a command printing a marker, and the
    // output is read up to the marker's own line and the next prompt: no
    // timing involved. Waiting for the prompt matters: until zsh is back in
    // its line editor the terminal is in canonical mode, where the kernel
    // itself would echo the line and ^U would erase it before zsh saw the
    // TAB (CI hit exactly that once).
    let driver = r#"
zmodload zsh/zpty || exit 3
compdir=$1 conf=$2; shift 2
zpty -b z "env -i HOME=/tmp TERM=dumb PATH=/usr/bin:/bin SHAREDLOOP_CONFIG=$conf zsh -f -i"
zpty -w z "PS1='@P@ '; fpath=($compdir \$fpath); autoload -Uz compinit; compinit -u -D; sharedloop() { :; }; unsetopt beep; unset zle_bracketed_paste"
upto() {
  zpty -w z "print -r -- __END_$1__"
  REPLY=
  zpty -r z REPLY "*"$'\n'"__END_$1__"$'\r'"*@P@ *" || exit 4
}
upto 0
integer n=0
for l in "$@"; do
  (( n++ ))
  zpty -w -n z "$l"$'\t'
  zpty -w -n z $'\C-u'
  upto $n
  print -r -- "=== $l"
  print -r -- "${REPLY//$'\r'/}"
done
zpty -d z
"#;
    let cases: Vec<(String, Vec<String>)> = vec![
        ("sharedloop i".into(), vec!["sharedloop import ".into()]),
        ("sharedloop add --fst".into(), vec!["sharedloop add --fstype".into()]),
        ("sharedloop add --fstype x".into(), vec!["sharedloop add --fstype xfs ".into()]),
        ("sharedloop rm deb".into(), vec!["sharedloop rm debian:12 ".into()]),
        ("sharedloop verify lib".into(), vec!["sharedloop verify library/busybox:1.36 ".into()]),
        ("sharedloop gc --d".into(), vec!["sharedloop gc --dry-run ".into()]),
        ("sharedloop rm --name".into(), vec!["sharedloop rm --name-only ".into()]),
        ("sharedloop import docker-a".into(), vec!["sharedloop import docker-archive:".into()]),
        ("sharedloop import docker:/".into(), vec!["sharedloop import docker://".into()]),
        ("sharedloop import --registries-c".into(), vec!["sharedloop import --registries-conf=".into()]),
        (format!("sharedloop import oci:{ds}/src/oc"), vec![format!("sharedloop import oci:{ds}/src/ocidir/")]),
        (format!("sharedloop --loopback-root {ds}/fb2 rm o"), vec![format!("sharedloop --loopback-root {ds}/fb2 rm other:1 ")]),
        // Ambiguous: the listing shows every command.
        ("sharedloop ".into(), cli_surface().keys().filter(|k| !k.is_empty()).map(|k| format!("{k} ")).collect()),
    ];
    let mut cmd = Command::new("timeout");
    cmd.args(["120", "zsh", "-f", "-c", driver, "driver"]).arg(repo().join("completions")).arg(d.join("sharedloop.conf"));
    for (l, _) in &cases {
        cmd.arg(l);
    }
    let out = ok(&mut cmd);
    let blocks: Vec<&str> = out.split("=== ").skip(1).collect();
    assert_eq!(blocks.len(), cases.len(), "{out}");
    for ((line, wants), block) in cases.iter().zip(blocks) {
        let (head, body) = block.split_once('\n').unwrap_or((block, ""));
        assert_eq!(head, line, "{out}");
        for w in wants {
            assert!(body.contains(w.as_str()), "zsh: {line:?}<TAB> should show {w:?}, got:\n{body}");
        }
    }
}

// ---------------------------------------------------------- Debian package

/// `dpkg-deb -c`: path -> (mode string, owner, link target).
fn deb_contents(deb: &Path) -> BTreeMap<String, (String, String, Option<String>)> {
    let out = ok(Command::new("dpkg-deb").arg("-c").arg(deb));
    let mut m = BTreeMap::new();
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        assert!(f.len() >= 6, "{l}");
        let path = f[5].trim_start_matches('.').trim_end_matches('/').to_string();
        let target = (f.len() == 8 && f[6] == "->").then(|| f[7].to_string());
        if !path.is_empty() {
            m.insert(path, (f[0].to_string(), f[1].to_string(), target));
        }
    }
    m
}

/// What the package must hold, from what the repository has: (path, mode,
/// link target).
fn expected_deb_files() -> Vec<(String, &'static str, Option<&'static str>)> {
    let mut v: Vec<(String, &'static str, Option<&'static str>)> = vec![
        ("/usr/bin/sharedloop".into(), "-rwxr-xr-x", None),
        ("/sbin/mount.sharedloop".into(), "lrwxrwxrwx", Some("/usr/bin/sharedloop")),
        ("/sbin/umount.sharedloop".into(), "lrwxrwxrwx", Some("/usr/bin/sharedloop")),
        ("/etc/sharedloop/sharedloop.conf".into(), "-rw-r--r--", None),
        ("/usr/share/man/man8/mount.sharedloop.8.gz".into(), "-rw-r--r--", None),
        ("/usr/share/man/man8/umount.sharedloop.8.gz".into(), "-rw-r--r--", None),
        ("/usr/share/man/man8/sharedloop.8.gz".into(), "-rw-r--r--", None),
        ("/usr/share/man/man5/sharedloop.conf.5.gz".into(), "-rw-r--r--", None),
        ("/usr/share/bash-completion/completions/sharedloop".into(), "-rw-r--r--", None),
        ("/usr/share/zsh/vendor-completions/_sharedloop".into(), "-rw-r--r--", None),
        ("/usr/share/doc/sharedloop/README.md.gz".into(), "-rw-r--r--", None),
    ];
    for f in files_in("fstab.d", "") {
        v.push((format!("/usr/share/doc/sharedloop/fstab.d/{f}"), "-rw-r--r--", None));
    }
    for f in files_in("udev", ".rules") {
        v.push((format!("/usr/lib/udev/rules.d/{f}"), "-rw-r--r--", None));
    }
    for f in files_in("packaging/tmpfiles.d", ".conf") {
        v.push((format!("/usr/lib/tmpfiles.d/{f}"), "-rw-r--r--", None));
    }
    for f in files_in("packaging", ".mount") {
        v.push((format!("/usr/share/doc/sharedloop/examples/{f}"), "-rw-r--r--", None));
    }
    v
}

/// Holds a private mount namespace in which the installed /usr/bin and
/// /sbin of `root` lie over the host's, and /run/mount (utab) is private.
struct Namespace {
    child: Child,
    pid: u32,
}

impl Namespace {
    fn new(root: &Path) -> Namespace {
        let usr_bin = std::fs::canonicalize("/usr/bin").unwrap();
        let sbin = std::fs::canonicalize("/sbin").unwrap();
        let script = format!(
            "set -e; mkdir -p /run/mount; mount -t tmpfs sl-pkg-utab /run/mount; \
             mount -t overlay sl-pkg-bin -o lowerdir={rb}:{ub} {ub}; \
             mount -t overlay sl-pkg-sbin -o lowerdir={rs}:{sb} {sb}; \
             echo ready; exec sleep 100000",
            rb = root.join("usr/bin").display(),
            ub = usr_bin.display(),
            rs = root.join("sbin").display(),
            sb = sbin.display(),
        );
        let mut child = Command::new("unshare")
            .args(["-m", "--propagation", "private", "--", "sh", "-c", &script])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("unshare");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let pid = child.id();
        let ns = Namespace { child, pid };
        assert_eq!(line.trim(), "ready", "namespace did not start");
        ns
    }

    fn cmd(&self, env: &[(&str, String)], args: &[&str]) -> Command {
        let mut c = Command::new("nsenter");
        c.args(["-t", &self.pid.to_string(), "-m", "--"]).args(args);
        // PATH-independent: only the system directories, where dpkg put
        // the files.
        c.env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        c.env_remove("SHAREDLOOP_FAILPOINT");
        for (k, v) in env {
            c.env(k, v);
        }
        c.stdin(Stdio::null());
        c
    }

    fn mountinfo(&self) -> Vec<String> {
        std::fs::read_to_string(format!("/proc/{}/mountinfo", self.pid)).unwrap().lines().map(String::from).collect()
    }

    fn read(&self, p: &Path) -> Option<String> {
        std::fs::read_to_string(format!("/proc/{}/root{}", self.pid, p.display())).ok()
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every path below `root` (relative, with a leading '/'), the dpkg
/// database excepted.
fn tree(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            let rel = format!("/{}", p.strip_prefix(root).unwrap().display());
            if rel.starts_with("/var/lib/dpkg") {
                continue;
            }
            if e.file_type().unwrap().is_dir() {
                stack.push(p.clone());
            }
            out.insert(rel);
        }
    }
    out
}

fn dpkg(root: &Path, log: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("dpkg");
    c.arg(format!("--root={}", root.display()))
        .arg(format!("--log={}", log.display()))
        // Maintainer scripts run on the host with DPKG_ROOT set: the root
        // has no shell to chroot into.
        .arg("--force-script-chrootless")
        .args(args);
    c
}

#[test]
fn deb_package_builds_installs_mounts_and_purges() {
    make("deb");
    let arch = ok(Command::new("dpkg").arg("--print-architecture")).trim().to_string();
    let deb = repo().join(format!("target/sharedloop_{}_{arch}.deb", version()));
    assert!(deb.is_file(), "{} not built", deb.display());

    // ---- the package as built
    let fields = ok(Command::new("dpkg-deb").arg("-f").arg(&deb).args(["Package", "Version", "Architecture", "Depends", "Recommends", "Maintainer", "Description"]));
    for want in [
        "Package: sharedloop\n".to_string(),
        format!("Version: {}\n", version()),
        format!("Architecture: {arch}\n"),
    ] {
        assert!(fields.contains(&want), "control lacks {want:?}:\n{fields}");
    }
    let depends = fields.lines().find_map(|l| l.strip_prefix("Depends: ")).expect("Depends");
    for d in ["libc6 (>= 2.", "mount (>= 2.38)", "e2fsprogs"] {
        assert!(depends.contains(d), "Depends lacks {d}: {depends}");
    }
    // bash reads no completion directory itself: bash-completion (which
    // apt installs with the package, Recommends being installed by
    // default) loads ours.
    assert!(fields.contains("Recommends: xfsprogs, erofs-utils, bash-completion"), "{fields}");
    let conffiles = ok(Command::new("dpkg-deb").arg("-I").arg(&deb).arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/sharedloop/sharedloop.conf");
    let control_members = ok(Command::new("dpkg-deb").arg("-I").arg(&deb));
    for m in ["control", "conffiles", "md5sums", "postinst", "postrm"] {
        assert!(control_members.lines().any(|l| l.contains(" bytes,") && l.split_whitespace().any(|w| w == m)), "no {m} in:\n{control_members}");
    }

    let contents = deb_contents(&deb);
    let expected = expected_deb_files();
    let mut want_paths: BTreeSet<String> = BTreeSet::new();
    for (p, mode, target) in &expected {
        let got = contents.get(p).unwrap_or_else(|| panic!("{p} not in the package: {contents:#?}"));
        assert_eq!(got.0, *mode, "{p}: mode");
        assert_eq!(got.1, "root/root", "{p}: owner");
        assert_eq!(got.2.as_deref(), *target, "{p}: link target");
        // The directories leading to it.
        let mut d = Path::new(p).parent();
        while let Some(x) = d {
            if x != Path::new("/") {
                want_paths.insert(x.display().to_string());
            }
            d = x.parent();
        }
        want_paths.insert(p.clone());
    }
    let got_paths: BTreeSet<String> = contents.keys().cloned().collect();
    assert_eq!(got_paths, want_paths, "package contents differ (extra: {:?}, missing: {:?})",
        got_paths.difference(&want_paths).collect::<Vec<_>>(), want_paths.difference(&got_paths).collect::<Vec<_>>());
    for (p, (mode, _, _)) in &contents {
        if mode.starts_with('d') {
            assert_eq!(mode, "drwxr-xr-x", "{p}");
        }
    }

    // ---- installed into a private root with a fresh dpkg database
    let dir = std::env::temp_dir().join(format!("sl-pkg-deb-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let root = dir.join("root");
    for d in ["var/lib/dpkg/info", "var/lib/dpkg/updates", "var/lib/dpkg/triggers"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(root.join("var/lib/dpkg/status"), "").unwrap();
    let log = dir.join("dpkg.log");
    // Its dependencies are the host's, not in this root.
    let out = ok(dpkg(&root, &log, &["--force-depends", "-i"]).arg(&deb));
    assert!(out.contains("Setting up sharedloop"), "{out}");
    let status = ok(&mut dpkg(&root, &log, &["-s", "sharedloop"]));
    assert!(status.contains("Status: install ok installed"), "{status}");
    // Every file as the package says (md5sums), and where we expect it.
    let verify = ok(&mut dpkg(&root, &log, &["--verify", "sharedloop"]));
    assert_eq!(verify, "", "dpkg --verify");
    let installed = tree(&root);
    for (p, _, target) in &expected {
        let abs = root.join(p.trim_start_matches('/'));
        let meta = std::fs::symlink_metadata(&abs).unwrap_or_else(|e| panic!("{p} not installed: {e}"));
        match target {
            Some(t) => assert_eq!(std::fs::read_link(&abs).unwrap(), Path::new(t), "{p}"),
            None => assert!(meta.is_file(), "{p}"),
        }
    }
    for (rel, src) in [
        ("usr/share/bash-completion/completions/sharedloop", "completions/sharedloop.bash"),
        ("usr/share/zsh/vendor-completions/_sharedloop", "completions/_sharedloop"),
        ("etc/sharedloop/sharedloop.conf", "packaging/sharedloop.conf"),
    ] {
        assert_eq!(std::fs::read(root.join(rel)).unwrap(), std::fs::read(repo().join(src)).unwrap(), "{rel}");
    }
    // The installed man pages: found by name, and formatted without a warning.
    for (sect, name) in [("8", "mount.sharedloop"), ("8", "umount.sharedloop"), ("8", "sharedloop"), ("5", "sharedloop.conf")] {
        let w = ok(Command::new("man").arg("-M").arg(root.join("usr/share/man")).args(["-w", sect, name]));
        assert_eq!(w.trim(), root.join(format!("usr/share/man/man{sect}/{name}.{sect}.gz")).display().to_string());
        let o = Command::new("man").args(["--warnings", "-l"]).arg(w.trim()).env("MANWIDTH", "80").output().unwrap();
        assert!(o.status.success() && o.stderr.is_empty() && o.stdout.len() > 500, "man {name}: {}", out_str(&o));
    }
    // postinst ran systemd-tmpfiles for the root (chrootless, DPKG_ROOT).
    if have("systemd-tmpfiles") && !files_in("packaging/tmpfiles.d", ".conf").is_empty() {
        let tmpfiles = std::fs::read_to_string(repo().join("packaging/tmpfiles.d/sharedloop.conf")).unwrap_or_default();
        for l in tmpfiles.lines().filter(|l| l.starts_with("d ")) {
            let p = l.split_whitespace().nth(1).unwrap();
            assert!(root.join(p.trim_start_matches('/')).is_dir(), "postinst: tmpfiles did not create {p} in the root");
        }
    }
    // What was not from the package (what tmpfiles made): may stay on purge.
    let package_paths: BTreeSet<String> = contents.keys().cloned().collect();
    let made_by_scripts: BTreeSet<String> = installed.difference(&package_paths).cloned().collect();

    // A local change to the conffile, kept over a reinstall: the store of
    // this test, which the installed binaries then use.
    let conf_path = root.join("etc/sharedloop/sharedloop.conf");
    let store_root = dir.join("store/root");
    let store_fb = dir.join("store/private");
    let mut conf = std::fs::read_to_string(&conf_path).unwrap();
    conf.push_str(&format!("loopback_root={}\nloopback_fallback={}\n", store_root.display(), store_fb.display()));
    std::fs::write(&conf_path, &conf).unwrap();
    ok(dpkg(&root, &log, &["--force-depends", "-i"]).arg(&deb));
    assert_eq!(std::fs::read_to_string(&conf_path).unwrap(), conf, "reinstall replaced the changed conffile");

    // ---- use it: only the installed files
    let env = [
        ("SHAREDLOOP_CONFIG", conf_path.display().to_string()),
        ("SHAREDLOOP_STATE_DIR", dir.join("state").display().to_string()),
    ];
    {
        let ns = Namespace::new(&root);
        let run = |args: &[&str]| ok(&mut ns.cmd(&env, args));
        // The names resolve to the installed binary, through the absolute link.
        assert_eq!(run(&["sh", "-c", "command -v sharedloop"]).trim(), "/usr/bin/sharedloop");
        assert_eq!(run(&["readlink", "/sbin/mount.sharedloop"]).trim(), "/usr/bin/sharedloop");
        run(&["cmp", "/sbin/mount.sharedloop", &root.join("usr/bin/sharedloop").display().to_string()]);
        run(&["cmp", "/sbin/umount.sharedloop", &root.join("usr/bin/sharedloop").display().to_string()]);
        assert_eq!(run(&["sharedloop", "--version"]).trim(), format!("sharedloop {}", version()));

        // Two layers, built with the installed `sharedloop add`, into the
        // store the conffile names.
        let base = dir.join("src/base");
        let top = dir.join("src/top");
        make_tree(&base, &[("a.txt", E::File("from base\n")), ("shadow.txt", E::File("base\n"))]);
        make_tree(&top, &[("b.txt", E::File("from top\n")), ("shadow.txt", E::File("top\n"))]);
        let base_id = run(&["sharedloop", "add", &base.display().to_string()]).trim().to_string();
        assert!(base_id.starts_with("sha256:") && base_id.len() == 71, "{base_id}");
        let top_id = run(&["sharedloop", "add", &top.display().to_string(), "--parent", &base_id, "--name", "pkgtest:1"]).trim().to_string();
        assert!(store_root.join("layers").join(&top_id[7..]).join("layer.img").is_file(), "layer not in the conffile's store");
        assert!(store_root.join("names/pkgtest:1").is_file());
        let status = run(&["sharedloop", "status"]);
        assert!(status.contains(&format!("Loopback Root Directory: {}", store_root.display())), "{status}");

        let check_view = |m: &Path| {
            assert_eq!(ns.read(&m.join("a.txt")).as_deref(), Some("from base\n"));
            assert_eq!(ns.read(&m.join("b.txt")).as_deref(), Some("from top\n"));
            assert_eq!(ns.read(&m.join("shadow.txt")).as_deref(), Some("top\n"));
        };
        let overlay_at = |m: &Path| -> Option<String> {
            let t = m.display().to_string();
            ns.mountinfo().into_iter().find_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let right: Vec<&str> = l.split(" - ").nth(1)?.split(' ').collect();
                (f[4] == t && right[0] == "overlay").then(|| right[1].to_string())
            })
        };
        let records = || {
            std::fs::read_dir(dir.join("state/mounts"))
                .map(|r| r.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".json")).count())
                .unwrap_or(0)
        };

        // 1. The helper itself, as mount(8) would run it.
        let ma = dir.join("mnt/a");
        std::fs::create_dir_all(&ma).unwrap();
        let mas = ma.display().to_string();
        run(&["/sbin/mount.sharedloop", "pkgtest:1", &mas, "-o", "upper=tmpfs,upper_size=64M"]);
        assert_eq!(overlay_at(&ma).as_deref(), Some("pkgtest:1"));
        check_view(&ma);
        run(&["sh", "-c", &format!("echo written > {mas}/new.txt")]);
        assert_eq!(ns.read(&ma.join("new.txt")).as_deref(), Some("written\n"));
        assert_eq!(loops_under(&dir).len(), 2, "one loop device per layer");
        let utab = ns.read(Path::new("/run/mount/utab")).unwrap_or_default();
        assert!(utab.contains(&format!("SRC=pkgtest:1 TARGET={mas} ")) && utab.contains("helper=sharedloop"), "{utab}");
        assert!(run(&["sharedloop", "mounts"]).contains(&mas));
        run(&["/sbin/umount.sharedloop", &mas]);
        assert!(overlay_at(&ma).is_none());
        assert!(loops_under(&dir).is_empty(), "umount.sharedloop returned before the loop devices were freed");
        assert_eq!(records(), 0);

        // 2. Through mount(8) and umount(8), which find the helpers in /sbin.
        let mb = dir.join("mnt/b");
        std::fs::create_dir_all(&mb).unwrap();
        let mbs = mb.display().to_string();
        run(&["mount", "-t", "sharedloop", "pkgtest:1", &mbs]);
        assert_eq!(overlay_at(&mb).as_deref(), Some("pkgtest:1"));
        check_view(&mb);
        assert_eq!(records(), 1);
        run(&["umount", &mbs]);
        assert!(overlay_at(&mb).is_none());
        // The record is gone: umount(8) ran umount.sharedloop.
        assert_eq!(records(), 0, "umount(8) did not run umount.sharedloop");
        assert_eq!(ns.read(Path::new("/run/mount/utab")).unwrap_or_default(), "");

        // Nothing left: no mount of ours, no loop device on our files.
        let d = dir.display().to_string();
        let left: Vec<String> = ns
            .mountinfo()
            .into_iter()
            .filter(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let rest = l.split(" - ").nth(1).unwrap_or("");
                f[4].starts_with(&d) || (rest.starts_with("overlay ") && !rest.starts_with("overlay sl-pkg-"))
            })
            .collect();
        assert!(left.is_empty(), "mounts left: {left:#?}");
        assert!(wait_no_loops(&dir, Duration::from_secs(10)), "loop devices left: {:?}", loops_under(&dir));
    }
    assert!(wait_no_loops(&dir, Duration::from_secs(10)), "loop devices left: {:?}", loops_under(&dir));

    // ---- remove: everything but the conffile goes
    ok(&mut dpkg(&root, &log, &["-r", "sharedloop"]));
    let status = ok(&mut dpkg(&root, &log, &["-s", "sharedloop"]));
    assert!(status.contains("Status: deinstall ok config-files"), "{status}");
    let after_remove = tree(&root);
    for (p, _, _) in &expected {
        if p == "/etc/sharedloop/sharedloop.conf" {
            assert!(after_remove.contains(p), "dpkg -r removed the conffile");
        } else {
            assert!(!after_remove.contains(p), "{p} left after dpkg -r");
        }
    }
    // ---- purge: nothing of the package is left
    ok(&mut dpkg(&root, &log, &["-P", "sharedloop"]));
    let o = dpkg(&root, &log, &["-s", "sharedloop"]).output().unwrap();
    assert!(!o.status.success(), "still known after purge: {}", out_str(&o));
    let after_purge = tree(&root);
    let stray: Vec<&String> = after_purge
        .iter()
        .filter(|p| !made_by_scripts.contains(*p) && !["/var", "/var/lib"].contains(&p.as_str()))
        .collect();
    assert!(stray.is_empty(), "left after purge: {stray:?}");
    assert!(!root.join("etc/sharedloop").exists());

    // Layers and the store are data: never touched by the package.
    assert!(store_root.join("names/pkgtest:1").is_file());
    assert!(loops_under(&dir).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------- RPM

#[test]
fn rpm_spec_builds_the_same_layout() {
    let spec = repo().join("packaging/rpm/sharedloop.spec");
    let text = std::fs::read_to_string(&spec).unwrap();
    assert!(text.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == ["Version:", &version()]), "spec Version is not {}", version());
    if !have("rpmbuild") {
        make("deps");
    }
    if !have("rpmbuild") {
        eprintln!("rpmbuild not available: only the spec's version was checked");
        return;
    }
    // The spec parses, with the version of Cargo.toml.
    let parsed = ok(Command::new("rpmspec").arg("-P").arg(&spec));
    assert!(parsed.contains("%files"), "{parsed}");
    let q = ok(Command::new("rpmspec").args(["-q", "--srpm", "--qf", "%{NAME} %{VERSION}\n"]).arg(&spec));
    assert_eq!(q.trim(), format!("sharedloop {}", version()));

    make("rpm");
    let rpm = std::fs::read_dir(repo().join("target"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let n = p.file_name().unwrap().to_string_lossy().into_owned();
            n.starts_with(&format!("sharedloop-{}-", version())) && n.ends_with(".rpm") && !n.ends_with(".src.rpm")
        })
        .expect("rpm in target/");
    let list = ok(Command::new("rpm").args(["-qp", "--qf", "[%{FILEMODES:perms} %{FILENAMES} %{FILELINKTOS}\n]"]).arg(&rpm));
    let mut got: BTreeMap<String, (String, String)> = BTreeMap::new();
    for l in list.lines() {
        let f: Vec<&str> = l.split(' ').collect();
        let path = f[1].trim_end_matches(".gz").to_string();
        if path.starts_with("/usr/lib/.build-id") {
            continue;
        }
        got.insert(path, (f[0].to_string(), f.get(2).unwrap_or(&"").to_string()));
    }
    // The Debian layout, with /usr/sbin for /sbin, site-functions for zsh,
    // uncompressed or compressed man pages and README alike.
    for (p, mode, target) in expected_deb_files() {
        let p = p
            .replace("/sbin/", "/usr/sbin/")
            .replace("/usr/usr/", "/usr/")
            .replace("vendor-completions", "site-functions")
            .trim_end_matches(".gz")
            .to_string();
        let (m, t) = got.get(&p).unwrap_or_else(|| panic!("{p} not in the rpm:\n{list}"));
        assert_eq!(m, mode, "{p}");
        if target.is_some() {
            assert_eq!(t, "../bin/sharedloop", "{p}");
        }
    }
    let config = ok(Command::new("rpm").args(["-qp", "--configfiles"]).arg(&rpm));
    assert_eq!(config.trim(), "/etc/sharedloop/sharedloop.conf");
    let scripts = ok(Command::new("rpm").args(["-qp", "--scripts"]).arg(&rpm));
    assert!(scripts.contains("udevadm control --reload") && scripts.contains("systemd-tmpfiles --create"), "{scripts}");
    let reqs = ok(Command::new("rpm").args(["-qp", "--requires"]).arg(&rpm));
    assert!(reqs.contains("util-linux") && reqs.contains("e2fsprogs"), "{reqs}");
    let recs = ok(Command::new("rpm").args(["-qp", "--recommends"]).arg(&rpm));
    assert!(recs.lines().any(|l| l.trim() == "bash-completion"), "{recs}");
}
