//! Fuzzing the three programs' command lines: about 2000 generated argv
//! (random bytes, non-UTF-8, commas, quotes, '=' and flag-like words) for
//! mount.sharedloop, umount.sharedloop and sharedloop. Every run must end
//! (under `timeout -s KILL 20`), with a documented exit code and no panic,
//! and leave nothing behind.
//!
//! Safety: every mount.sharedloop runs with `-f` (mount nothing) and the
//! test's own store first in `-o`; no word can spell `-N` (enter another
//! namespace); every absolute path is under the test's directory and no
//! word holds "..", so umount.sharedloop only sees paths that are not mount
//! points; `sharedloop` gets the test's store before its subcommand, and
//! `add` a directory that does not exist. Relative paths resolve in a
//! deleted working directory.
//!
//! Process start-up is the cost: the cases run from a few bash scripts in
//! the namespace (one `nsenter` each), two at a time.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::time::Instant;

const CASES: usize = 2000;
const BATCHES: usize = 4;
/// util-linux's helper exit codes; `sharedloop` uses the same ones
/// (a clap usage error is exit 1 there, `--help` 0).
const CODES: &[i32] = &[0, 1, 2, 4, 8, 16, 32];

/// xorshift64*: deterministic, seeded by a constant.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    /// A byte of argv (never NUL), often one a parser looks at.
    fn byte(&mut self) -> u8 {
        match self.below(8) {
            0..=2 => *self.pick(b"-,=\"' /:ofsvnlrtx\n\t"),
            3 | 4 => b'a' + self.below(26) as u8,
            5 | 6 => 0x80 + self.below(128) as u8,
            _ => 1 + self.below(255) as u8,
        }
    }

    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = self.below(max + 1);
        (0..n).map(|_| self.byte()).collect()
    }
}

struct Gen<'a> {
    rng: Rng,
    dir: &'a [u8],
    store: Vec<u8>,
}

impl Gen<'_> {
    /// Make a word safe to pass: no "..", an absolute path lands under the
    /// test's directory, and (for the helpers) a flag word cannot hold 'N'.
    fn safe(&self, w: Vec<u8>, helper: bool) -> Vec<u8> {
        let mut w = nodots(w);
        if helper && w.first() == Some(&b'-') {
            for b in &mut w {
                if *b == b'N' {
                    *b = b'n';
                }
            }
        }
        if w.first() == Some(&b'/') {
            let mut p = self.dir.to_vec();
            p.extend(&w);
            w = p;
        }
        w
    }

    fn path(&mut self) -> Vec<u8> {
        let r = self.rng.below(4);
        let mut p = self.dir.to_vec();
        p.extend_from_slice(match r {
            0 => &b"/mnt/m"[..],
            1 => b"/nx/",
            2 => b"/mnt/",
            _ => b"/",
        });
        let tail = self.rng.bytes(8);
        p.extend(tail.into_iter().filter(|&b| b != b'/'));
        nodots(p)
    }

    /// An option string for -o.
    fn options(&mut self) -> Vec<u8> {
        const ITEMS: &[&str] = &[
            "ro", "rw", "nosuid", "noexec", "upper=none", "upper=tmpfs", "upper=work1", "upper=", "upper_size=1G",
            "upper_size=0", "upper_fstype=xfs", "upper_mmp=on", "upper_alloc=sparse", "direct_io=off", "mount_api=legacy",
            "loop_api=setfd", "metacopy=on", "volatile", "xino=auto", "layers=sha256:00", "layers=img", "comment=x",
            "x-systemd.automount", "_netdev", "nofail", "override_kernel_check", "staging_dir=/s", "bogus", "bogus=1",
            "\"", "a=\"b,c\"", ",,", "=",
        ];
        let n = self.rng.below(5);
        let mut items: Vec<Vec<u8>> = Vec::new();
        for _ in 0..n {
            let it = match self.rng.below(4) {
                0 | 1 => self.rng.pick(ITEMS).as_bytes().to_vec(),
                2 => {
                    let mut k = self.rng.pick(ITEMS).split('=').next().unwrap().as_bytes().to_vec();
                    k.push(b'=');
                    k.extend(self.rng.bytes(10));
                    k
                }
                _ => self.rng.bytes(12),
            };
            items.push(it);
        }
        if self.rng.chance(10) {
            // Another store under the test's directory.
            let mut s = b"loopback_root=".to_vec();
            s.extend(self.dir);
            s.extend(b"/other");
            items.push(s);
        }
        self.safe(items.join(&b","[..]), true)
    }

    /// A random helper word.
    fn helper_word(&mut self, umount: bool) -> Vec<u8> {
        const FLAGS: &[&str] = &["-f", "-s", "-n", "-v", "-r", "-w", "-i", "-l", "-fv", "-snv", "-x", "-", "--", "--help", "--version", "--bogus", "-t", "-o"];
        let w = match self.rng.below(10) {
            0..=2 => self.rng.pick(FLAGS).as_bytes().to_vec(),
            3 => {
                let mut w = b"-o".to_vec();
                w.extend(self.options());
                w
            }
            4 => b"-o".to_vec(),
            5 => {
                let mut w = b"-t".to_vec();
                let types: [&[u8]; 4] = [b"sharedloop", b"sharedloop.x", b"ext4", b""];
                let t = *self.rng.pick(&types);
                w.extend_from_slice(t);
                w.extend(self.rng.bytes(3));
                w
            }
            6 if !umount => self.options(),
            6 | 7 => self.path(),
            8 => self.rng.pick(&["img", "sha256:00", "nosuch", "a b", "a,b", "caf\u{e9}"]).as_bytes().to_vec(),
            _ => {
                let mut w = if self.rng.chance(40) { b"-".to_vec() } else { Vec::new() };
                w.extend(self.rng.bytes(10));
                w
            }
        };
        self.safe(w, true)
    }

    fn mount(&mut self) -> Vec<Vec<u8>> {
        let mut store = b"-o".to_vec();
        store.extend(&self.store);
        let mut v = vec![b"mount.sharedloop".to_vec(), b"-f".to_vec(), store];
        // Mostly two positionals somewhere among the flags, to get past argv.
        let n = self.rng.below(6);
        let mut words: Vec<Vec<u8>> = (0..n).map(|_| self.helper_word(false)).collect();
        if self.rng.chance(70) {
            let srcs: [&[u8]; 5] = [b"img", b"nosuch", b"sha256:00", b"img\xff", b"a,b"];
            let src = self.rng.pick(&srcs).to_vec();
            let at = self.rng.below(words.len() + 1);
            words.insert(at, src);
            let at = self.rng.below(words.len() + 1);
            let p = self.path();
            words.insert(at, p);
        }
        v.extend(words);
        v
    }

    fn umount(&mut self) -> Vec<Vec<u8>> {
        let mut v = vec![b"umount.sharedloop".to_vec()];
        let n = self.rng.below(5);
        for _ in 0..n {
            v.push(self.helper_word(true));
        }
        if self.rng.chance(60) {
            let at = 1 + self.rng.below(v.len());
            let p = self.path();
            v.insert(at, p);
        }
        v
    }

    fn admin(&mut self, bin: &[u8]) -> Vec<Vec<u8>> {
        let mut root = self.dir.to_vec();
        root.extend(b"/root");
        let mut fb = self.dir.to_vec();
        fb.extend(b"/fallback");
        let mut v = vec![bin.to_vec(), b"--loopback-root".to_vec(), root, b"--loopback-fallback".to_vec(), fb];
        if self.rng.chance(10) {
            v.push(b"-v".to_vec());
        }
        let sub: &[&[u8]] = match self.rng.below(6) {
            0 => &[b"ls"],
            1 => &[b"verify"],
            2 => &[b"gc", b"--dry-run"],
            3 => &[b"rm"],
            4 => &[b"add"],
            _ => &[b"ls", b"--json"],
        };
        v.extend(sub.iter().map(|s| s.to_vec()));
        if sub[0] == b"add" {
            let mut d = self.dir.to_vec();
            d.extend(b"/nx/");
            d.extend(self.rng.bytes(8).into_iter().filter(|&b| b != b'/'));
            v.push(nodots(d));
        }
        const FLAGS: &[&str] = &[
            "--json", "--deep", "--dry-run", "--name-only", "--min-age", "--min-age=0", "--min-age=1x", "--parent", "--name",
            "--fstype", "--fstype=xfs", "--staging-dir", "--help", "--version", "--bogus", "-q", "-v", "--", "-",
        ];
        let n = self.rng.below(5);
        for _ in 0..n {
            let w = match self.rng.below(4) {
                0 | 1 => self.rng.pick(FLAGS).as_bytes().to_vec(),
                2 => self.rng.pick(&["img", "nosuch", "sha256:00", "a:b", "x:y:z", "caf\u{e9}", "1h", "0"]).as_bytes().to_vec(),
                _ => self.rng.bytes(10),
            };
            v.push(self.safe(w, false));
        }
        v
    }
}

/// No ".." anywhere: a path cannot climb out of the test's directory.
fn nodots(mut w: Vec<u8>) -> Vec<u8> {
    while let Some(i) = w.windows(2).position(|p| p == b"..") {
        w[i + 1] = b'_';
    }
    w
}

/// A byte string as one bash word.
fn quote(b: &[u8]) -> String {
    let mut s = String::from("$'");
    for &c in b {
        if c.is_ascii_alphanumeric() || b"/_.:-=+@%".contains(&c) {
            s.push(c as char);
        } else {
            s.push_str(&format!("\\{c:03o}"));
        }
    }
    s.push('\'');
    s
}

#[test]
fn fuzz_command_lines() {
    let t0 = Instant::now();
    let env = Env::new("fuzz-cli");
    env.add(None, Some("img"), &[("a.txt", E::File("a\n"))]);
    env.mnt("m");
    let dir = env.dir.as_os_str().as_encoded_bytes().to_vec();
    let store = env.store_opts().into_bytes();
    let mut g = Gen { rng: Rng(0x5eed_1e55_f00d_cafe), dir: &dir, store };

    let mut cases: Vec<Vec<Vec<u8>>> = Vec::with_capacity(CASES);
    for i in 0..CASES {
        cases.push(match i % 3 {
            0 => g.mount(),
            1 => g.umount(),
            _ => g.admin(BIN.as_bytes()),
        });
    }

    let errs = env.dir.join("fuzz-err");
    std::fs::create_dir_all(&errs).unwrap();
    let mut scripts = Vec::new();
    for b in 0..BATCHES {
        let cwd = env.dir.join(format!("fuzz-cwd-{b}"));
        let mut sc = String::from("set -u\n");
        sc += &format!("export SHAREDLOOP_SYSLOG_SOCKET={}\n", quote(env.dir.join("no-syslog").as_os_str().as_encoded_bytes()));
        // Relative paths resolve in a directory that is gone.
        sc += &format!("mkdir {c} && cd {c} && rmdir {c} || exit 99\n", c = quote(cwd.as_os_str().as_encoded_bytes()));
        sc += &format!(
            "t() {{ n=$1; shift; timeout -s KILL 20 \"$@\" >/dev/null 2>{}/$n; echo \"case $n rc=$?\"; }}\n",
            quote(errs.as_os_str().as_encoded_bytes())
        );
        for (i, c) in cases.iter().enumerate().filter(|(i, _)| i % BATCHES == b) {
            sc += &format!("t {i} {}\n", c.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" "));
        }
        let p = env.dir.join(format!("fuzz-{b}.sh"));
        std::fs::write(&p, sc).unwrap();
        scripts.push(p);
    }

    let t1 = Instant::now();
    // Two at a time (two cores); each script one nsenter.
    let mut outs = Vec::new();
    for pair in scripts.chunks(2) {
        let children: Vec<_> = pair
            .iter()
            .map(|p| env.command(&["bash", p.to_str().unwrap()]).stdout(std::process::Stdio::piped()).spawn().expect("spawn"))
            .collect();
        for c in children {
            let o = c.wait_with_output().unwrap();
            assert!(o.status.success(), "script failed: {o:?}");
            outs.push(String::from_utf8(o.stdout).unwrap());
        }
    }
    let ran = t1.elapsed();

    let mut rc: BTreeMap<usize, i32> = BTreeMap::new();
    for l in outs.iter().flat_map(|o| o.lines()) {
        let (n, c) = l.strip_prefix("case ").and_then(|l| l.split_once(" rc=")).unwrap_or_else(|| panic!("bad line {l:?}"));
        rc.insert(n.parse().unwrap(), c.parse().unwrap());
    }
    assert_eq!(rc.len(), CASES, "every case reported");
    let mut by_code: BTreeMap<(usize, i32), usize> = BTreeMap::new();
    let mut bad = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let code = rc[&i];
        let stderr = std::fs::read(errs.join(i.to_string())).unwrap_or_default();
        let stderr = String::from_utf8_lossy(&stderr);
        *by_code.entry((i % 3, code)).or_default() += 1;
        if !CODES.contains(&code) || stderr.contains("panicked") || stderr.contains("RUST_BACKTRACE") {
            let argv: Vec<String> = c.iter().map(|w| String::from_utf8_lossy(w).into_owned()).collect();
            bad.push(format!("case {i} exit {code}: {argv:?}\n  stderr: {stderr}"));
        }
    }
    eprintln!("fuzz_cli: {CASES} cases in {ran:?} (total {:?}); (program 0=mount 1=umount 2=sharedloop, exit) -> count: {by_code:?}", t0.elapsed());
    assert!(bad.is_empty(), "{} bad runs:\n{}", bad.len(), bad.join("\n"));
    // Each program got past its argv parser sometimes, and was refused sometimes.
    for p in 0..3 {
        assert!(by_code.keys().any(|&(q, c)| q == p && c == 0), "program {p}: no run succeeded: {by_code:?}");
        assert!(by_code.keys().any(|&(q, c)| q == p && c == 1), "program {p}: no usage error: {by_code:?}");
    }
    env.assert_clean();
}
