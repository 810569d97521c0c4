//! Mount/umount latency: `mount.sharedloop` against the util-linux way
//! (`losetup` + `mount` per layer, then one overlay mount) on the same
//! layer images (the store's default format: erofs where the kernel has
//! it, else ext4), for chains of 1, 32, 128 and 500 layers; plus the
//! second mount of a chain that is already in use (every loop device and
//! layer superblock reused).
//!
//! Run (root only; it attaches loop devices and mounts):
//!
//! ```text
//! cargo bench --bench mount                     # REPS=7, sizes 1,32,128,500
//! cargo bench --bench mount -- --quick          # REPS=2 smoke run
//! cargo bench --bench mount -- --sizes 1,32     # choose chain lengths
//! cargo bench --bench mount -- --reps 15        # choose REPS
//! ```
//!
//! For digging into a result:
//!
//! ```text
//! -- --sl-opts direct_io=off       # extra mount.sharedloop -o options
//! -- --bin /path/to/sharedloop     # time another build (A/B)
//! -- --fstype ext4|erofs           # the layer format (default: what `add`
//!                                  # and `import` write on this kernel,
//!                                  # erofs where the kernel has it)
//! -- --profile 128 [--profile-out DIR]
//!        # one 128-layer chain: first mount, second mount and both umounts
//!        # under strace -c, strace -ttt -T, SHAREDLOOP_DEBUG=1, perf stat,
//!        # perf trace -s and perf record -g (if perf exists); files in DIR
//!        # (default /var/tmp/sharedloop-bench-profile), no table
//! -- --sizes 128 --exec 'SCRIPT'   # run SCRIPT in the bench's namespace
//!        # with the store built (see exec_script for its environment)
//! ```
//!
//! The binary under test: cargo sets `CARGO_BIN_EXE_sharedloop` for benches
//! as for integration tests, and builds it with the `bench` profile (which
//! inherits `release`), so `cargo bench` times an optimized
//! `target/release/sharedloop`. Its path is printed with the results.
//! `mount.sharedloop` and `umount.sharedloop` are symlinks to it in the
//! bench's temporary directory (the binary dispatches on argv[0]); both run
//! with `-n` (no utab), `SHAREDLOOP_STATE_DIR` in the temporary directory and
//! `SHAREDLOOP_CONFIG` empty (no configuration file).
//!
//! Isolation: the bench first enters a new mount namespace (unshare
//! CLONE_NEWNS while still single-threaded) and makes `/` recursively
//! private, so every mount it or its children make stays in that namespace
//! and dies with it. Loop devices are not namespaced: every mount, and every
//! device attached with losetup (those have no autoclear), is held by a
//! guard whose Drop undoes it, also on panic. At the end the bench asserts
//! that no loop device is backed by a file under its temporary directory,
//! then removes the directory. It never touches devices or mounts it did not
//! make itself.
//!
//! The store is written directly (no `sharedloop add`): one chain of
//! max(sizes) layers, each an erofs image written by sharedloop's own
//! writer or a sparse 4 MiB ext4 image made with `mkfs.ext4 -d` (4 KiB
//! blocks, no journal, as `add` makes them), from a
//! directory holding two files of its own (`layer-NNN.txt`, `d/NNN`) and a
//! `shared.txt` every layer has; meta.json carries a unique diff ID and the
//! OCI chain ID. The chain of N layers is mounted by the chain ID of layer
//! N-1 (counted from the bottom): parents are followed from the top, so the
//! sizes share one set of images.
//!
//! Each size runs one untimed warm-up round of each way, then REPS rounds;
//! in every round the three measurements run in a rotating order:
//!   a. sharedloop: `mount.sharedloop -n TOP T -o store,upper=tmpfs` and
//!      `umount.sharedloop -n T`, each timed around the child process.
//!   b. util-linux: `mount -t tmpfs` for the upper (+ mkdir upper, work),
//!      `losetup --find --show --read-only` per layer, `mount -o ro -t ext4`
//!      per layer, one `mount -t overlay` with absolute lowerdir paths; then
//!      `umount` of the overlay and of each layer, `losetup -d` of each
//!      device, `umount` of the tmpfs. The per-layer mount points exist
//!      beforehand (not timed). Paths are kept short
//!      (/var/tmp/slb-PID/l/K); when the option string still exceeds the 4095
//!      bytes mount(2) takes (it would silently mount fewer layers), the size
//!      is reported n/a.
//!   c. second mount: with the chain mounted at T1 (untimed), time
//!      `mount.sharedloop` of the same chain at T2 and its umount.
//! After every mount the merged view is checked (N `layer-*.txt` files,
//! `shared.txt` from the top layer) and the number of loop devices backed by
//! store files must be N (also after the second mount: reuse); after every
//! umount it must drop to 0 (or stay N while T1 holds the chain), polled up
//! to 10 s. Any failure panics after cleaning up.
//!
//! Fairness notes: losetup attaches with buffered I/O (its default), while
//! sharedloop defaults to direct_io=on, which makes the kernel fsync the
//! image file on every LOOP_CONFIGURE and reads the layer's metadata past
//! the page cache (try `--sl-opts direct_io=off`). cargo's LD_LIBRARY_PATH
//! is removed before anything is spawned, as installed helpers run without
//! it. The machine is shared: the report gives the CPU and I/O pressure
//! (PSI) seen during the run, as a hint of outside noise.
//!
//! Output: a Markdown table of medians with [min–max] in milliseconds.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[path = "util/mod.rs"]
mod util;
use util::Pressure;

use rustix::mount::{MountPropagationFlags, UnmountFlags};
use rustix::thread::UnshareFlags;
use sharedloop::store::ids::{Digest, chain_id};
use sharedloop::store::{FsType, LayerMeta};

const BIN: &str = env!("CARGO_BIN_EXE_sharedloop");
/// mount(2) copies one page of options; the last byte is the NUL.
const MOUNT2_OPTS_MAX: usize = 4095;
const IMAGE_SIZE: u64 = 4 << 20;
const UPPER_SIZE: &str = "64M";
const SETTLE: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------- arguments

struct Args {
    reps: usize,
    sizes: Vec<usize>,
    quick: bool,
    /// `--profile N`: no timing table; trace one N-layer chain's mounts.
    profile: Option<usize>,
    profile_out: PathBuf,
    /// `--sl-opts OPTS`: appended to mount.sharedloop's -o (experiments,
    /// e.g. direct_io=off or mount_api=path).
    sl_opts: Option<String>,
    /// `--exec SCRIPT`: no timing table; run SCRIPT with sh in the bench's
    /// namespace once the store exists (see `exec_script`).
    exec: Option<String>,
    /// `--bin PATH`: time another sharedloop build (A/B comparisons).
    bin: Option<PathBuf>,
    /// `--fstype ext4|erofs`: what the layer images are (default: the
    /// store's default format on this kernel).
    fstype: FsType,
}

fn parse_args() -> Args {
    let mut a = Args {
        reps: 7,
        sizes: vec![1, 32, 128, 500],
        quick: false,
        profile: None,
        profile_out: PathBuf::from("/var/tmp/sharedloop-bench-profile"),
        sl_opts: None,
        exec: None,
        bin: None,
        fstype: sharedloop::store::default_layer_fstype(None).0,
    };
    let mut reps = None;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (k, inline) = match arg.split_once('=') {
            Some((k, v)) if k.starts_with("--") => (k.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let mut val = |k: &str| inline.clone().or_else(|| it.next()).unwrap_or_else(|| usage(&format!("{k} needs a value")));
        match k.as_str() {
            // cargo bench passes --bench to harness = false targets.
            "--bench" => {}
            "--quick" => a.quick = true,
            "--sizes" => {
                a.sizes = val("--sizes")
                    .split(',')
                    .map(|s| match s.trim().parse::<usize>() {
                        Ok(n) if (1..=500).contains(&n) => n,
                        _ => usage(&format!("--sizes: {s:?} is not a chain length in 1..=500")),
                    })
                    .collect();
            }
            "--profile" => {
                let n = val("--profile").parse::<usize>().ok().filter(|n| (1..=500).contains(n));
                a.profile = Some(n.unwrap_or_else(|| usage("--profile: want a chain length in 1..=500")));
            }
            "--fstype" => {
                a.fstype = match val("--fstype").as_str() {
                    "ext4" => FsType::Ext4,
                    "erofs" => FsType::Erofs,
                    other => usage(&format!("--fstype: {other:?} is not ext4 or erofs")),
                }
            }
            "--bin" => a.bin = Some(PathBuf::from(val("--bin"))),
            "--exec" => a.exec = Some(val("--exec")),
            "--sl-opts" => a.sl_opts = Some(val("--sl-opts")),
            "--profile-out" => a.profile_out = PathBuf::from(val("--profile-out")),
            "--reps" => reps = Some(val("--reps").parse::<usize>().ok().filter(|&n| n > 0).unwrap_or_else(|| usage("--reps: want a positive number"))),
            "-h" | "--help" => usage(""),
            other => usage(&format!("unknown argument {other:?}")),
        }
    }
    a.reps = reps.unwrap_or(if a.quick { 2 } else { 7 });
    if let Some(n) = a.profile {
        a.sizes = vec![n];
    }
    a.sizes.sort_unstable();
    a.sizes.dedup();
    a
}

fn usage(msg: &str) -> ! {
    if !msg.is_empty() {
        eprintln!("mount bench: {msg}");
    }
    eprintln!("usage: cargo bench --bench mount -- [--quick] [--sizes 1,32,128,500] [--reps N] [--sl-opts OPTS] [--bin PATH] [--fstype ext4|erofs]");
    eprintln!("       cargo bench --bench mount -- --profile N [--profile-out DIR]");
    eprintln!("       cargo bench --bench mount -- --sizes N --exec SCRIPT");
    std::process::exit(2);
}

// ---------------------------------------------------------------- helpers

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn describe(c: &Command) -> String {
    let mut s = c.get_program().to_string_lossy().into_owned();
    for a in c.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Run a child to completion; panic with its output if it fails. Returns
/// stdout and the wall time around the child.
fn run(c: &mut Command) -> (String, Duration) {
    c.stdin(Stdio::null());
    let t = Instant::now();
    let out = c.output().unwrap_or_else(|e| panic!("spawn {}: {e}", describe(c)));
    let el = t.elapsed();
    if !out.status.success() {
        panic!(
            "command failed ({}): {}\nstdout: {}\nstderr: {}",
            out.status,
            describe(c),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    (String::from_utf8_lossy(&out.stdout).into_owned(), el)
}

/// Attached loop devices whose backing file is under `dir`: (number, path).
fn loops_under(dir: &Path) -> Vec<(u32, String)> {
    let d = format!("{}/", dir.display());
    let mut out = vec![];
    let Ok(rd) = std::fs::read_dir("/sys/block") else { return out };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(n) = name.strip_prefix("loop").and_then(|s| s.parse::<u32>().ok()) else { continue };
        if let Some(b) = backing_of(n).filter(|b| b.starts_with(&d)) {
            out.push((n, b));
        }
    }
    out.sort();
    out
}

fn backing_of(n: u32) -> Option<String> {
    std::fs::read_to_string(format!("/sys/block/loop{n}/loop/backing_file")).ok().map(|s| s.trim_end().to_string())
}

/// Poll until exactly `want` devices are backed by files under `dir`.
/// Returns (ok, whether it had to wait).
fn settle_loops(dir: &Path, want: usize) -> (bool, bool) {
    let start = Instant::now();
    let mut waited = false;
    loop {
        if loops_under(dir).len() == want {
            return (true, waited);
        }
        if start.elapsed() >= SETTLE {
            return (false, waited);
        }
        waited = true;
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Mount points (as in /proc/self/mountinfo) at or below `dir`, deepest
/// (most recent) last.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let d = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|mp| *mp == d || mp.starts_with(&format!("{d}/")))
        .map(|mp| PathBuf::from(mp.replace("\\040", " ")))
        .collect()
}

// ---------------------------------------------------------------- the bench directory

/// The temporary directory: store, mount points, helpers, state. Dropped
/// (also on panic), it detaches what is still mounted below it, waits for
/// its loop devices to go (and detaches leftovers: any device backed by a
/// file in this fresh directory is ours), and removes it only if nothing
/// is left.
struct Workdir {
    path: PathBuf,
}

impl Workdir {
    fn create() -> Workdir {
        // /var/tmp: on disk (here the same ext4 as /), unlike a tmpfs /tmp.
        let path = PathBuf::from(format!("/var/tmp/slb-{}", std::process::id()));
        if path.exists() {
            panic!("{} exists already", path.display());
        }
        std::fs::create_dir_all(&path).unwrap();
        Workdir { path }
    }

    fn finish(self) {
        let (ok, _) = settle_loops(&self.path, 0);
        assert!(ok, "loop devices still attached at the end: {:?}", loops_under(&self.path));
        let m = mounts_under(&self.path);
        assert!(m.is_empty(), "still mounted at the end: {m:?}");
        // Drop removes the directory.
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        for mp in mounts_under(&self.path).iter().rev() {
            let _ = rustix::mount::unmount(mp, UnmountFlags::DETACH);
        }
        let (ok, _) = settle_loops(&self.path, 0);
        if !ok {
            for (n, _) in loops_under(&self.path) {
                let _ = Command::new("losetup").arg("-d").arg(format!("/dev/loop{n}")).status();
            }
        }
        let (ok, _) = settle_loops(&self.path, 0);
        if ok && mounts_under(&self.path).is_empty() {
            if let Err(e) = std::fs::remove_dir_all(&self.path) {
                eprintln!("mount bench: remove {}: {e}", self.path.display());
            }
        } else {
            eprintln!(
                "mount bench: leaving {} in place: loops {:?}, mounts {:?}",
                self.path.display(),
                loops_under(&self.path),
                mounts_under(&self.path)
            );
        }
    }
}

// ---------------------------------------------------------------- the store

struct Chain {
    root: PathBuf,
    fallback: PathBuf,
    /// Chain ID of layer k (bottom = 0): the top of the chain of k+1 layers.
    ids: Vec<Digest>,
    images: Vec<PathBuf>,
    fstype: FsType,
}

impl Chain {
    fn store_opts(&self) -> String {
        format!("loopback_root={},loopback_fallback={}", self.root.display(), self.fallback.display())
    }
}

fn build_store(work: &Path, n: usize, fstype: FsType) -> Chain {
    let root = work.join("store");
    let fallback = work.join("fallback");
    let layers = root.join("layers");
    std::fs::create_dir_all(&layers).unwrap();
    let src = work.join("src");
    let salt = format!(
        "{}.{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
    );
    let mut ids = Vec::with_capacity(n);
    let mut images = Vec::with_capacity(n);
    let mut parent: Option<Digest> = None;
    for k in 0..n {
        let _ = std::fs::remove_dir_all(&src);
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join(format!("layer-{k:03}.txt")), format!("layer {k}\n")).unwrap();
        std::fs::write(src.join("d").join(format!("{k:03}")), format!("{salt} {k}\n")).unwrap();
        std::fs::write(src.join("shared.txt"), format!("{k}\n")).unwrap();

        let diff_id = Digest::of_bytes(format!("sharedloop mount bench {salt} layer {k}").as_bytes());
        let id = chain_id(parent.as_ref(), &diff_id);
        let dir = layers.join(id.hex());
        std::fs::create_dir(&dir).unwrap();
        let img = dir.join("layer.img");
        match fstype {
            // As `add` writes them: sharedloop's own writer (owners are
            // the bench's, root).
            FsType::Erofs => {
                sharedloop::image::erofs_writer::write_dir(&src, &img, sharedloop::image::uuid_for(&id.to_string()), false)
                    .unwrap_or_else(|e| panic!("writing {}: {e}", img.display()));
            }
            _ => {
                std::fs::File::create(&img).unwrap().set_len(IMAGE_SIZE).unwrap();
                run(Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-T", "default", "-m", "0", "-b", "4096", "-I", "256"])
                    .args(["-O", "^has_journal,^resize_inode", "-E", "root_owner=0:0,nodiscard", "-d"])
                    .arg(&src)
                    .arg(&img));
            }
        }
        let size = std::fs::metadata(&img).unwrap().len();
        let meta = LayerMeta {
            chain_id: id,
            diff_id,
            parent,
            fstype,
            size,
            created: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs(),
        };
        std::fs::write(dir.join("meta.json"), serde_json::to_string_pretty(&meta).unwrap()).unwrap();
        ids.push(id);
        images.push(img);
        parent = Some(id);
    }
    let _ = std::fs::remove_dir_all(&src);
    Chain { root, fallback, ids, images, fstype }
}

/// The merged view at `target` shows exactly the first `n` layers, top last.
fn check_merged(target: &Path, n: usize, what: &str) {
    let names: Vec<String> = std::fs::read_dir(target)
        .unwrap_or_else(|e| panic!("{what}: read {}: {e}", target.display()))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    let layer_files = names.iter().filter(|f| f.starts_with("layer-")).count();
    assert_eq!(layer_files, n, "{what}: {} shows {layer_files} layer files, want {n}", target.display());
    let shared = std::fs::read_to_string(target.join("shared.txt")).unwrap_or_default();
    assert_eq!(shared, format!("{}\n", n - 1), "{what}: shared.txt is not the top layer's");
    // The upper is writable.
    std::fs::write(target.join("written.txt"), b"x").unwrap_or_else(|e| panic!("{what}: write to {}: {e}", target.display()));
}

// ---------------------------------------------------------------- sharedloop

struct Ctx {
    work: PathBuf,
    helpers: PathBuf,
    state: PathBuf,
    chain: Chain,
    /// `--sl-opts`, appended to mount.sharedloop's options.
    extra_opts: Option<String>,
}

impl Ctx {
    fn mount_opts(&self) -> String {
        let mut o = format!("{},upper=tmpfs,upper_size={UPPER_SIZE}", self.chain.store_opts());
        if let Some(e) = &self.extra_opts {
            o.push(',');
            o.push_str(e);
        }
        o
    }

    fn helper(&self, name: &str) -> Command {
        let mut c = Command::new(self.helpers.join(name));
        c.env("SHAREDLOOP_STATE_DIR", &self.state)
            .env("SHAREDLOOP_CONFIG", "")
            .env_remove("SHAREDLOOP_FAILPOINT")
            .env_remove("SHAREDLOOP_DEBUG");
        c
    }

    fn loops(&self) -> usize {
        loops_under(&self.chain.root).len()
    }

    /// Loop devices a sharedloop mount of `n` layers holds: every layer on a
    /// loop device, erofs too (one superblock and page cache per layer per
    /// node; a file-backed erofs mount has its own).
    fn sl_loops(&self, n: usize) -> usize {
        n
    }

    #[track_caller]
    fn expect_loops(&self, want: usize, what: &str, waits: &mut u32) {
        let (ok, waited) = settle_loops(&self.chain.root, want);
        assert!(ok, "{what}: {} loop devices backed by store files after {SETTLE:?}, want {want}", self.loops());
        if waited {
            *waits += 1;
        }
    }
}

/// A sharedloop overlay; Drop unmounts it if the bench did not.
struct SlMount<'a> {
    ctx: &'a Ctx,
    target: PathBuf,
    mounted: bool,
}

impl<'a> SlMount<'a> {
    fn mount(ctx: &'a Ctx, n: usize, target: &Path) -> (SlMount<'a>, Duration) {
        let top = ctx.chain.ids[n - 1].to_string();
        let opts = ctx.mount_opts();
        let mut c = ctx.helper("mount.sharedloop");
        c.arg("-n").arg(&top).arg(target).arg("-o").arg(&opts);
        // The guard exists before the child runs: if it fails half-way and
        // we panic, Drop still tries to unmount.
        let mut m = SlMount { ctx, target: target.to_path_buf(), mounted: true };
        let (_, t) = run(&mut c);
        check_merged(target, n, "sharedloop");
        m.mounted = true;
        (m, t)
    }

    fn umount(mut self) -> Duration {
        let mut c = self.ctx.helper("umount.sharedloop");
        c.arg("-n").arg(&self.target);
        let (_, t) = run(&mut c);
        self.mounted = false;
        t
    }
}

impl Drop for SlMount<'_> {
    fn drop(&mut self) {
        if !self.mounted || !mounts_under(&self.target).contains(&self.target) {
            return;
        }
        let ok = self
            .ctx
            .helper("umount.sharedloop")
            .arg("-n")
            .arg(&self.target)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = rustix::mount::unmount(&self.target, UnmountFlags::DETACH);
        }
    }
}

// ---------------------------------------------------------------- util-linux

/// What the util-linux way holds; Drop releases whatever is left, in order.
#[derive(Default)]
struct UlMount {
    upper_tmpfs: Option<PathBuf>,
    devices: Vec<String>,
    layer_mounts: Vec<PathBuf>,
    overlay: Option<PathBuf>,
}

struct UlPaths {
    /// Per-layer mount points, index = layer from the bottom.
    dirs: Vec<PathBuf>,
    upper: PathBuf,
    target: PathBuf,
}

fn ul_options(p: &UlPaths, n: usize) -> String {
    let lower: Vec<String> = (0..n).rev().map(|k| p.dirs[k].to_string_lossy().into_owned()).collect();
    format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.join(":"),
        p.upper.join("upper").display(),
        p.upper.join("work").display()
    )
}

impl UlMount {
    fn mount(ctx: &Ctx, p: &UlPaths, n: usize) -> (UlMount, Duration) {
        let opts = ul_options(p, n);
        assert!(opts.len() <= MOUNT2_OPTS_MAX, "caller checks the option length");
        let mut g = UlMount::default();
        let t = Instant::now();
        run(Command::new("mount").args(["-t", "tmpfs", "-o", &format!("size={UPPER_SIZE},mode=0755"), "tmpfs"]).arg(&p.upper));
        g.upper_tmpfs = Some(p.upper.clone());
        std::fs::create_dir(p.upper.join("upper")).unwrap();
        std::fs::create_dir(p.upper.join("work")).unwrap();
        for img in &ctx.chain.images[..n] {
            let (dev, _) = run(Command::new("losetup").args(["--find", "--show", "--read-only"]).arg(img));
            g.devices.push(dev.trim().to_string());
        }
        for k in 0..n {
            run(Command::new("mount").args(["-o", "ro", "-t", ctx.chain.fstype.as_str(), &g.devices[k]]).arg(&p.dirs[k]));
            g.layer_mounts.push(p.dirs[k].clone());
        }
        run(Command::new("mount").args(["-t", "overlay", "overlay", "-o", &opts]).arg(&p.target));
        g.overlay = Some(p.target.clone());
        let el = t.elapsed();
        check_merged(&p.target, n, "util-linux");
        (g, el)
    }

    fn umount(mut self) -> Duration {
        let t = Instant::now();
        if let Some(o) = &self.overlay {
            run(Command::new("umount").arg(o));
            self.overlay = None;
        }
        while let Some(m) = self.layer_mounts.pop() {
            run(Command::new("umount").arg(&m));
        }
        while let Some(d) = self.devices.pop() {
            run(Command::new("losetup").arg("-d").arg(&d));
        }
        if let Some(u) = &self.upper_tmpfs {
            run(Command::new("umount").arg(u));
            self.upper_tmpfs = None;
        }
        t.elapsed()
    }
}

impl Drop for UlMount {
    fn drop(&mut self) {
        if let Some(o) = self.overlay.take() {
            let _ = rustix::mount::unmount(&o, UnmountFlags::DETACH);
        }
        while let Some(m) = self.layer_mounts.pop() {
            let _ = rustix::mount::unmount(&m, UnmountFlags::DETACH);
        }
        // Devices we attached: detach them if they still have the backing
        // file we gave them (a device busy under a lazy unmount gets
        // autoclear from LOOP_CLR_FD and goes when the mount does).
        for d in self.devices.drain(..).rev() {
            let n: Option<u32> = d.strip_prefix("/dev/loop").and_then(|s| s.parse().ok());
            if n.and_then(backing_of).is_some() {
                let _ = Command::new("losetup").arg("-d").arg(&d).stderr(Stdio::null()).status();
            }
        }
        if let Some(u) = self.upper_tmpfs.take() {
            let _ = rustix::mount::unmount(&u, UnmountFlags::DETACH);
        }
    }
}

// ---------------------------------------------------------------- statistics

#[derive(Default)]
struct Series(Vec<Duration>);

impl Series {
    fn push(&mut self, d: Duration) {
        self.0.push(d);
    }
    fn sorted(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self.0.iter().copied().map(ms).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v
    }
    fn median(&self) -> f64 {
        let v = self.sorted();
        let n = v.len();
        if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
    }
    fn cell(&self) -> String {
        if self.0.is_empty() {
            return "–".into();
        }
        let v = self.sorted();
        format!("{} [{}–{}]", fmt_ms(self.median()), fmt_ms(v[0]), fmt_ms(v[v.len() - 1]))
    }
}

fn fmt_ms(x: f64) -> String {
    if x >= 100.0 {
        format!("{x:.0}")
    } else if x >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.2}")
    }
}

#[derive(Default)]
struct SizeResult {
    n: usize,
    sl_mount: Series,
    sl_umount: Series,
    sl_total: Series,
    ul_mount: Series,
    ul_umount: Series,
    ul_total: Series,
    ul_na: Option<String>,
    second_mount: Series,
    second_umount: Series,
    /// The floor of a second mount, in this process by raw syscalls:
    /// upper and overlay over layer mounts made beforehand (untimed).
    raw_overlay: Series,
    /// The same including the layer mounts from the attached devices and
    /// their release.
    raw_second: Series,
    /// Times the loop count had to be polled for after umount.sharedloop
    /// returned (it should have waited for autoclear itself).
    late_detach: u32,
}

// ---------------------------------------------------------------- rounds

#[derive(Clone, Copy)]
enum Way {
    Sharedloop,
    UtilLinux,
    Second,
}

fn round(ctx: &Ctx, ul: &UlPaths, r: &mut SizeResult, way: Way, record: bool) {
    let n = r.n;
    let t1 = ctx.work.join("mnt/t1");
    let t2 = ctx.work.join("mnt/t2");
    let mut waits = 0;
    match way {
        Way::Sharedloop => {
            let (m, tm) = SlMount::mount(ctx, n, &t1);
            ctx.expect_loops(ctx.sl_loops(n), "after sharedloop mount", &mut 0);
            let tu = m.umount();
            ctx.expect_loops(0, "after umount.sharedloop", &mut waits);
            if record {
                r.sl_mount.push(tm);
                r.sl_umount.push(tu);
                r.sl_total.push(tm + tu);
            }
        }
        Way::UtilLinux => {
            if r.ul_na.is_some() {
                return;
            }
            let (g, tm) = UlMount::mount(ctx, ul, n);
            ctx.expect_loops(n, "after util-linux mount", &mut 0);
            let tu = g.umount();
            ctx.expect_loops(0, "after util-linux umount", &mut 0);
            if record {
                r.ul_mount.push(tm);
                r.ul_umount.push(tu);
                r.ul_total.push(tm + tu);
            }
        }
        Way::Second => {
            let (first, _) = SlMount::mount(ctx, n, &t1);
            let held = ctx.sl_loops(n);
            ctx.expect_loops(held, "after first mount", &mut 0);
            let (second, tm) = SlMount::mount(ctx, n, &t2);
            // Reuse: still one device per layer.
            ctx.expect_loops(held, "after second mount of the same chain", &mut 0);
            let tu = second.umount();
            ctx.expect_loops(held, "after umount of the second mount (first still holds the chain)", &mut 0);
            let (raw, raw_all) = raw_second_mount(ctx, n, &t2);
            ctx.expect_loops(held, "after the raw overlay mounts (first still holds the chain)", &mut 0);
            first.umount();
            ctx.expect_loops(0, "after umount of the first mount", &mut waits);
            if record {
                r.second_mount.push(tm);
                r.second_umount.push(tu);
                r.raw_overlay.push(raw);
                r.raw_second.push(raw_all);
            }
        }
    }
    if record {
        r.late_detach += waits;
    }
}

fn bench_size(ctx: &Ctx, n: usize, reps: usize) -> SizeResult {
    let mut r = SizeResult { n, ..Default::default() };
    let ul_dir = ctx.work.join("l");
    let ul = UlPaths {
        dirs: (0..n).map(|k| ul_dir.join(k.to_string())).collect(),
        upper: ctx.work.join("u"),
        target: ctx.work.join("mnt/t1"),
    };
    let opts_len = ul_options(&ul, n).len();
    if opts_len > MOUNT2_OPTS_MAX {
        r.ul_na = Some(format!("n/a (option string {opts_len} bytes exceeds mount(2)'s {MOUNT2_OPTS_MAX})"));
    }
    let ways = [Way::Sharedloop, Way::UtilLinux, Way::Second];
    let t = Instant::now();
    eprint!("  {n:>3} layers: warm-up");
    for w in ways {
        round(ctx, &ul, &mut r, w, false);
    }
    for rep in 0..reps {
        eprint!(" {}", rep + 1);
        let _ = std::io::stderr().flush();
        for i in 0..ways.len() {
            round(ctx, &ul, &mut r, ways[(rep + i) % ways.len()], true);
        }
    }
    eprintln!(" ({:.1} s)", t.elapsed().as_secs_f64());
    r
}

// ---------------------------------------------------------------- raw floor

/// The raw cost of a second mount of the first `n` layers, which another
/// mount holds: (a) a tmpfs upper plus the overlay over layer mounts made
/// beforehand, untimed (the issue's "raw cost of its upper plus
/// overlay"), and (b) the same plus making those layer mounts from the
/// attached devices and closing them, which any mount that shares the
/// devices has to do. Both with the new mount API, as the fd way does,
/// and attached at `target` (then unmounted, untimed).
fn raw_second_mount(ctx: &Ctx, n: usize, target: &Path) -> (Duration, Duration) {
    use rustix::mount::{FsMountFlags, FsOpenFlags, MountAttrFlags, MoveMountFlags};
    let by_image: std::collections::HashMap<String, u32> =
        loops_under(&ctx.chain.root).into_iter().map(|(n, b)| (b, n)).collect();
    let devices: Vec<u32> = ctx.chain.images[..n]
        .iter()
        .rev()
        .map(|img| *by_image.get(&img.to_string_lossy().into_owned()).expect("every layer attached by the first mount"))
        .collect();
    let fstype = ctx.chain.fstype.as_str();
    let layer_mounts = || -> Vec<rustix::fd::OwnedFd> {
        devices
            .iter()
            .map(|d| {
                let fs = rustix::mount::fsopen(fstype, FsOpenFlags::FSOPEN_CLOEXEC).unwrap();
                rustix::mount::fsconfig_set_string(&fs, "source", format!("/dev/loop{d}")).unwrap();
                rustix::mount::fsconfig_set_flag(&fs, "ro").unwrap();
                rustix::mount::fsconfig_create(&fs).unwrap();
                let attrs = MountAttrFlags::MOUNT_ATTR_RDONLY | MountAttrFlags::MOUNT_ATTR_NODEV | MountAttrFlags::MOUNT_ATTR_NOSUID;
                rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, attrs).unwrap()
            })
            .collect()
    };
    let overlay = |layers: &[rustix::fd::OwnedFd]| {
        let fs = rustix::mount::fsopen("tmpfs", FsOpenFlags::FSOPEN_CLOEXEC).unwrap();
        rustix::mount::fsconfig_set_string(&fs, "size", UPPER_SIZE).unwrap();
        rustix::mount::fsconfig_create(&fs).unwrap();
        let tmp = rustix::mount::fsmount(&fs, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty()).unwrap();
        let mode = rustix::fs::Mode::from_raw_mode(0o755);
        rustix::fs::mkdirat(&tmp, "upper", mode).unwrap();
        rustix::fs::mkdirat(&tmp, "work", mode).unwrap();
        let dir = |name: &str| {
            rustix::fs::openat(&tmp, name, rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC, rustix::fs::Mode::empty())
                .unwrap()
        };
        let (upper, work) = (dir("upper"), dir("work"));
        let ov = rustix::mount::fsopen("overlay", FsOpenFlags::FSOPEN_CLOEXEC).unwrap();
        rustix::mount::fsconfig_set_string(&ov, "source", "raw").unwrap();
        for l in layers {
            rustix::mount::fsconfig_set_fd(&ov, "lowerdir+", l).unwrap();
        }
        rustix::mount::fsconfig_set_fd(&ov, "upperdir", &upper).unwrap();
        rustix::mount::fsconfig_set_fd(&ov, "workdir", &work).unwrap();
        rustix::mount::fsconfig_create(&ov).unwrap();
        let m = rustix::mount::fsmount(&ov, FsMountFlags::FSMOUNT_CLOEXEC, MountAttrFlags::empty()).unwrap();
        rustix::mount::move_mount(&m, "", rustix::fs::CWD, target, MoveMountFlags::MOVE_MOUNT_F_EMPTY_PATH).unwrap();
    };
    let layers = layer_mounts();
    let t = Instant::now();
    overlay(&layers);
    let a = t.elapsed();
    rustix::mount::unmount(target, UnmountFlags::empty()).unwrap();
    drop(layers);
    let t = Instant::now();
    let layers = layer_mounts();
    overlay(&layers);
    drop(layers);
    let b = t.elapsed();
    rustix::mount::unmount(target, UnmountFlags::empty()).unwrap();
    (a, b)
}

// ---------------------------------------------------------------- --profile

/// One helper run under a wrapper (strace, perf), output kept in `out`.
fn wrapped(ctx: &Ctx, wrap: &[String], helper: &str, args: &[std::ffi::OsString], env: &[(&str, &str)]) -> Duration {
    let mut c = Command::new(&wrap[0]);
    c.args(&wrap[1..]).arg(ctx.helpers.join(helper)).args(args);
    c.env("SHAREDLOOP_STATE_DIR", &ctx.state)
        .env("SHAREDLOOP_CONFIG", "")
        .env_remove("SHAREDLOOP_FAILPOINT")
        .env_remove("SHAREDLOOP_DEBUG");
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c).1
}

/// `--profile N`: mount an N-layer chain under strace -c, strace -ttt -T,
/// perf record (if perf exists) and SHAREDLOOP_DEBUG=1, first mount and
/// second mount of the chain in use; files in `out`.
fn profile(ctx: &Ctx, n: usize, out: &Path) {
    std::fs::create_dir_all(out).unwrap();
    let t1 = ctx.work.join("mnt/t1");
    let t2 = ctx.work.join("mnt/t2");
    let top = ctx.chain.ids[n - 1].to_string();
    let opts = ctx.mount_opts();
    let margs = |t: &Path| -> Vec<std::ffi::OsString> {
        vec!["-n".into(), top.clone().into(), t.as_os_str().to_owned(), "-o".into(), opts.clone().into()]
    };
    let f = |name: &str| out.join(name).to_string_lossy().into_owned();
    let strace_c = |name: &str| vec!["strace".to_string(), "-f".into(), "-c".into(), "-S".into(), "time".into(), "-o".into(), f(name)];
    let strace_t = |name: &str| vec!["strace".to_string(), "-f".into(), "-ttt".into(), "-T".into(), "-s".into(), "96".into(), "-o".into(), f(name)];
    let plain = vec!["env".to_string()];
    let m1 = margs(&t1);
    let m2 = margs(&t2);
    let u1: Vec<std::ffi::OsString> = vec!["-n".into(), t1.as_os_str().to_owned()];
    let u2: Vec<std::ffi::OsString> = vec!["-n".into(), t2.as_os_str().to_owned()];
    let mut log = String::new();
    let mut note = |what: &str, d: Duration| {
        let line = format!("{what}: {:.1} ms\n", ms(d));
        eprint!("  {line}");
        log.push_str(&line);
    };

    // Warm-up, then the plain timings for reference.
    wrapped(ctx, &plain, "mount.sharedloop", &m1, &[]);
    wrapped(ctx, &plain, "umount.sharedloop", &u1, &[]);
    note("mount (plain)", wrapped(ctx, &plain, "mount.sharedloop", &m1, &[]));
    note("second mount (plain)", wrapped(ctx, &plain, "mount.sharedloop", &m2, &[]));
    note("second umount (plain)", wrapped(ctx, &plain, "umount.sharedloop", &u2, &[]));
    note("umount (plain)", wrapped(ctx, &plain, "umount.sharedloop", &u1, &[]));
    ctx.expect_loops(0, "profile: after umount", &mut 0);

    note("mount (strace -c)", wrapped(ctx, &strace_c("mount.strace-c"), "mount.sharedloop", &m1, &[]));
    note("second mount (strace -c)", wrapped(ctx, &strace_c("second-mount.strace-c"), "mount.sharedloop", &m2, &[]));
    note("second umount (strace -c)", wrapped(ctx, &strace_c("second-umount.strace-c"), "umount.sharedloop", &u2, &[]));
    note("umount (strace -c)", wrapped(ctx, &strace_c("umount.strace-c"), "umount.sharedloop", &u1, &[]));
    ctx.expect_loops(0, "profile: after umount", &mut 0);

    note("mount (strace -ttt)", wrapped(ctx, &strace_t("mount.trace"), "mount.sharedloop", &m1, &[]));
    note("second mount (strace -ttt)", wrapped(ctx, &strace_t("second-mount.trace"), "mount.sharedloop", &m2, &[]));
    note("second umount (strace -ttt)", wrapped(ctx, &strace_t("second-umount.trace"), "umount.sharedloop", &u2, &[]));
    note("umount (strace -ttt)", wrapped(ctx, &strace_t("umount.trace"), "umount.sharedloop", &u1, &[]));
    ctx.expect_loops(0, "profile: after umount", &mut 0);

    let dbg = [("SHAREDLOOP_DEBUG", "1")];
    let sh = |name: &str| {
        vec!["sh".to_string(), "-c".into(), format!("exec \"$0\" \"$@\" 2>{}", f(name))]
    };
    note("mount (debug log)", wrapped(ctx, &sh("mount.debug.log"), "mount.sharedloop", &m1, &dbg));
    note("umount (debug log)", wrapped(ctx, &sh("umount.debug.log"), "umount.sharedloop", &u1, &dbg));
    ctx.expect_loops(0, "profile: after umount", &mut 0);

    if Command::new("perf").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
        let perf = |name: &str, how: &[&str]| {
            let mut v = vec!["perf".to_string()];
            v.extend(how.iter().map(|s| s.to_string()));
            v.extend(["-o".to_string(), f(name), "--".into()]);
            v
        };
        let stat = ["stat", "-e", "task-clock,context-switches,cpu-migrations,page-faults"];
        let trace = ["trace", "-s"];
        let record = ["record", "-q", "-g", "-F", "9999"];
        for (tag, how) in [("perf-stat", &stat[..]), ("perf-trace", &trace[..]), ("perf-data", &record[..])] {
            note(&format!("mount ({tag})"), wrapped(ctx, &perf(&format!("mount.{tag}"), how), "mount.sharedloop", &m1, &[]));
            note(
                &format!("second mount ({tag})"),
                wrapped(ctx, &perf(&format!("second-mount.{tag}"), how), "mount.sharedloop", &m2, &[]),
            );
            note(
                &format!("second umount ({tag})"),
                wrapped(ctx, &perf(&format!("second-umount.{tag}"), how), "umount.sharedloop", &u2, &[]),
            );
            note(&format!("umount ({tag})"), wrapped(ctx, &perf(&format!("umount.{tag}"), how), "umount.sharedloop", &u1, &[]));
            ctx.expect_loops(0, "profile: after umount", &mut 0);
        }
    }
    std::fs::write(out.join("timings.txt"), log).unwrap();
    println!("profile of a {n}-layer chain written to {}", out.display());
}

/// `--exec SCRIPT`: run SCRIPT (sh -c) in the bench's namespace with the
/// store built, for ad-hoc experiments. Environment: SLB_WORK (the
/// temporary directory; mount points $SLB_WORK/mnt/t1 and t2), SLB_OPTS
/// (mount.sharedloop -o), SLB_TOP_<N> (top chain ID of each size),
/// SLB_IMAGES_<N> (the N images, bottom first, space-separated) and PATH
/// starting with the directory holding mount.sharedloop/umount.sharedloop;
/// SHAREDLOOP_STATE_DIR and SHAREDLOOP_CONFIG as for the bench. The script
/// must undo its own mounts; what it leaves is cleaned up like after a panic.
fn exec_script(ctx: &Ctx, sizes: &[usize], script: &str) {
    let mut c = Command::new("sh");
    c.arg("-c").arg(script);
    let path = format!("{}:{}", ctx.helpers.display(), std::env::var("PATH").unwrap_or_default());
    c.env("PATH", path)
        .env("SLB_WORK", &ctx.work)
        .env("SLB_OPTS", ctx.mount_opts())
        .env("SHAREDLOOP_STATE_DIR", &ctx.state)
        .env("SHAREDLOOP_CONFIG", "");
    for &n in sizes {
        c.env(format!("SLB_TOP_{n}"), ctx.chain.ids[n - 1].to_string());
        let imgs: Vec<String> = ctx.chain.images[..n].iter().map(|p| p.to_string_lossy().into_owned()).collect();
        c.env(format!("SLB_IMAGES_{n}"), imgs.join(" "));
    }
    let st = c.status().expect("run sh");
    for mp in mounts_under(&ctx.work).iter().rev() {
        let _ = rustix::mount::unmount(mp, UnmountFlags::DETACH);
    }
    assert!(st.success(), "--exec script failed: {st}");
}

// ---------------------------------------------------------------- main

fn enter_private_namespace() {
    // SAFETY: only NEWNS (no FILES), and no other thread exists yet.
    unsafe { rustix::thread::unshare_unsafe(UnshareFlags::NEWNS) }.expect("unshare(CLONE_NEWNS): the bench must run as root");
    rustix::mount::mount_change("/", MountPropagationFlags::PRIVATE | MountPropagationFlags::REC)
        .expect("make / recursively private");
}

fn main() {
    let started = Instant::now();
    let args = parse_args();
    // cargo runs benches with LD_LIBRARY_PATH pointing into target/ and the
    // toolchain; every child's dynamic loader would then probe those
    // directories (tens of failed stats, more for util-linux's several
    // libraries). Installed helpers run without it.
    // SAFETY: single-threaded still.
    unsafe { std::env::remove_var("LD_LIBRARY_PATH") };
    enter_private_namespace();

    let kernel = rustix::system::uname().release().to_string_lossy().into_owned();
    let cpus = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let max = *args.sizes.last().unwrap();
    let bin_arg = args.bin.clone().unwrap_or_else(|| PathBuf::from(BIN));
    let bin = std::fs::canonicalize(&bin_arg).unwrap_or_else(|e| panic!("{}: {e}", bin_arg.display()));
    eprintln!("mount bench: {} (kernel {kernel}, REPS={}, sizes {:?})", bin.display(), args.reps, args.sizes);

    let pressure = Pressure::now();
    let work = Workdir::create();
    let helpers = work.path.join("bin");
    std::fs::create_dir_all(&helpers).unwrap();
    for name in ["mount.sharedloop", "umount.sharedloop"] {
        std::os::unix::fs::symlink(&bin, helpers.join(name)).unwrap();
    }
    for d in ["state", "mnt/t1", "mnt/t2", "u"] {
        std::fs::create_dir_all(work.path.join(d)).unwrap();
    }
    for k in 0..max {
        std::fs::create_dir_all(work.path.join("l").join(k.to_string())).unwrap();
    }
    let t = Instant::now();
    let chain = build_store(&work.path, max, args.fstype);
    let store_time = t.elapsed();
    eprintln!("  store: {max} {} layers written in {:.1} s", args.fstype, store_time.as_secs_f64());
    let ctx = Ctx { work: work.path.clone(), helpers, state: work.path.join("state"), chain, extra_opts: args.sl_opts.clone() };

    let mut results = Vec::new();
    if let Some(n) = args.profile {
        profile(&ctx, n, &args.profile_out);
    } else if let Some(script) = &args.exec {
        exec_script(&ctx, &args.sizes, script);
    } else {
        for &n in &args.sizes {
            results.push(bench_size(&ctx, n, args.reps));
        }
    }
    assert_eq!(ctx.loops(), 0, "loop devices left attached");
    drop(ctx);
    work.finish();
    if results.is_empty() {
        return;
    }

    // ------------------------------------------------------------ report
    let mut o = String::new();
    o.push_str("### mount latency: sharedloop vs util-linux (losetup + mount per layer + overlay)\n\n");
    o.push_str(&format!(
        "kernel {kernel}, {cpus} CPUs, REPS={}{}; {} on /var/tmp, \
         tmpfs upper; milliseconds, median [min–max] of REPS rounds after one warm-up round.\n\n",
        args.reps,
        if args.quick { " (--quick)" } else { "" },
        match args.fstype {
            FsType::Erofs => "erofs layer images (uncompressed, written by sharedloop; both ways through loop devices)",
            _ => "ext4 layer images (4 MiB, no journal)",
        }
    ));
    if let Some(e) = &args.sl_opts {
        o.push_str(&format!("mount.sharedloop options: {e}\n\n"));
    }
    o.push_str(
        "| layers | sharedloop mount | sharedloop umount | util-linux mount | util-linux umount \
         | mount ratio (ul/sl) | mount+umount ratio | 2nd mount (chain in use) | 2nd umount |\n",
    );
    o.push_str("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for r in &results {
        let (ul_m, ul_u, ratio_m, ratio_t) = match &r.ul_na {
            Some(why) => (why.clone(), "n/a".to_string(), "n/a".to_string(), "n/a".to_string()),
            None => (
                r.ul_mount.cell(),
                r.ul_umount.cell(),
                format!("{:.1}×", r.ul_mount.median() / r.sl_mount.median()),
                format!("{:.1}×", r.ul_total.median() / r.sl_total.median()),
            ),
        };
        o.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.n,
            r.sl_mount.cell(),
            r.sl_umount.cell(),
            ul_m,
            ul_u,
            ratio_m,
            ratio_t,
            r.second_mount.cell(),
            r.second_umount.cell()
        ));
    }
    o.push_str(&format!(
        "\nRatios are of medians; mount+umount uses the median of each round's sum. \
         \"2nd mount\": mount.sharedloop of a chain another mount already holds ({}).\n",
        "loop devices and layer superblocks reused"
    ));
    o.push_str(
        "\nSecond mount against its raw floor (this process, raw syscalls, same target): \
         (a) tmpfs upper + overlay over layer mounts made beforehand; \
         (b) (a) plus making the layer mounts from the attached devices and closing them.\n\n\
         | layers | 2nd mount | raw (a) upper + overlay | ratio to (a) | raw (b) with layer mounts | ratio to (b) |\n\
         |---:|---:|---:|---:|---:|---:|\n",
    );
    for r in &results {
        o.push_str(&format!(
            "| {} | {} | {} | {:.1}× | {} | {:.1}× |\n",
            r.n,
            r.second_mount.cell(),
            r.raw_overlay.cell(),
            r.second_mount.median() / r.raw_overlay.median(),
            r.raw_second.cell(),
            r.second_mount.median() / r.raw_second.median()
        ));
    }
    let late: Vec<String> =
        results.iter().filter(|r| r.late_detach > 0).map(|r| format!("{} layers: {}×", r.n, r.late_detach)).collect();
    if !late.is_empty() {
        o.push_str(&format!(
            "\nNote: loop devices were still attached when umount.sharedloop returned (gone within {SETTLE:?}): {}\n",
            late.join(", ")
        ));
    }
    o.push_str(&format!(
        "\nPressure during the run (PSI \"some\", share of wall time): CPU {}, I/O {}; \
         CPU pressure means other load competed for the {cpus} CPUs.\n",
        pressure.share("cpu"),
        pressure.share("io")
    ));
    o.push_str(&format!(
        "\nbinary {}; store of {max} layers built in {:.1} s; total run {:.1} s\n",
        bin.display(),
        store_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    ));
    println!("{o}");
}
