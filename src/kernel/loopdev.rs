//! Loop devices: attach a backing file, or find the device that already
//! has it so that every mount of a layer shares one device and one
//! superblock (one page cache).
//!
//! Every device we attach has LO_FLAGS_AUTOCLEAR, so the kernel detaches it
//! when its last user goes: our fd while we set up, then the mount. Dropping
//! a `LoopDevice` before anything mounted it therefore undoes the attach,
//! even if we are killed. The only window without that guarantee is the
//! pre-5.8 LOOP_SET_FD path, between SET_FD and SET_STATUS64.

use std::collections::{BTreeSet, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Mutex;
use std::path::{Path, PathBuf};

use rustix::fs::{Mode, OFlags};
use rustix::io::Errno;

use crate::error::{Error, Result};
use crate::kernel::sys::{self, LO_FLAGS_AUTOCLEAR, LO_FLAGS_DIRECT_IO, LO_FLAGS_READ_ONLY, LoopInfo64};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

const LOOP_CONTROL: &str = "/dev/loop-control";
/// LOOP_CTL_GET_FREE hands the same device to racing processes; the loser
/// gets EBUSY and asks again. On a node where many jobs start at once,
/// other processes attach and detach devices all the time and can win
/// many races in a row (a 500-layer mount lost 64 in about 60 ms), so the
/// bound is a realistic deadline, not a count; signals still end the wait.
const ATTACH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// Back-off after the Nth lost race: 50 us doubling up to 10 ms, spread
/// by our pid so that racing processes do not retry in lockstep.
fn attach_backoff(attempt: u32) -> std::time::Duration {
    let base = (50u64 << attempt.min(8)).min(10_000);
    let spread = u64::from(std::process::id().wrapping_mul(2_654_435_761).wrapping_add(attempt)) % (base / 2 + 1);
    std::time::Duration::from_micros(base / 2 + spread)
}

#[derive(Debug)]
pub struct LoopDevice {
    pub number: u32,
    /// Held until the device is mounted; its close may autoclear the device.
    pub fd: OwnedFd,
    pub reused: bool,
    pub direct_io: bool,
    /// The backing file as the kernel names it: the path we attached (the
    /// canonical image path, which is what d_path gives back) or the one
    /// the index found, so that nobody reads sysfs for it again.
    pub backing: PathBuf,
}

impl LoopDevice {
    pub fn path(&self) -> PathBuf {
        dev_path(self.number)
    }
}

pub fn dev_path(n: u32) -> PathBuf {
    PathBuf::from(format!("/dev/loop{n}"))
}

fn sys_dir(n: u32) -> PathBuf {
    PathBuf::from(format!("/sys/block/loop{n}/loop"))
}

/// The backing file path the kernel shows for an attached device (bytes,
/// as d_path gives them: not necessarily UTF-8).
pub fn backing_file(n: u32) -> Option<PathBuf> {
    let mut b = std::fs::read(sys_dir(n).join("backing_file")).ok()?;
    if b.last() == Some(&b'\n') {
        b.pop();
    }
    Some(crate::bytes::path_from(&b))
}

/// An attached loop device: its number and the backing file the kernel
/// shows for it ([`backing_file`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attached {
    pub number: u32,
    pub backing: PathBuf,
}

/// Where [`attached`] looks for loop devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// /proc/partitions lists only loop devices with a backing file (a
    /// detached one has no capacity and is not shown), so the cost follows
    /// the devices in use, not the hundreds of idle ones a busy node keeps.
    /// Nor does it show one attached to an empty file: fine for a mount,
    /// to which a device found is only a hint.
    Partitions,
    /// Every `/sys/block/loopN`: complete, for what must see every user of
    /// a file (`ls`, `rm`, `gc`), at one sysfs lookup per idle device.
    Sysfs,
}

/// The attached loop devices `scan` finds, in the order it lists them.
/// The one scan of loop devices: mounts look in it for a device to share
/// ([`LoopIndex`]), `ls`, `rm` and `gc` for the devices using the store.
pub fn attached(scan: Scan) -> Vec<Attached> {
    let names: Vec<String> = match scan {
        Scan::Partitions => {
            partition_names(&std::fs::read_to_string("/proc/partitions").unwrap_or_default())
        }
        Scan::Sysfs => std::fs::read_dir("/sys/block")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect(),
    };
    attached_of(names, backing_file)
}

/// The device names of /proc/partitions (its fourth column).
fn partition_names(text: &str) -> Vec<String> {
    text.lines().filter_map(|l| l.split_whitespace().nth(3)).map(str::to_string).collect()
}

/// The `loopN` of `names` that `backing` gives a backing file.
fn attached_of(names: Vec<String>, backing: impl Fn(u32) -> Option<PathBuf>) -> Vec<Attached> {
    names
        .iter()
        .filter_map(|name| name.strip_prefix("loop")?.parse::<u32>().ok())
        .filter_map(|number| Some(Attached { number, backing: backing(number)? }))
        .collect()
}

/// Attached loop devices by backing file path. Only hints: a candidate is
/// confirmed with LOOP_GET_STATUS64 on an fd we hold.
///
/// Hints given by the caller (this node's mount records) are looked at
/// first; the scan of the devices (/proc/partitions, then sysfs for each
/// device listed) runs only if some layer is not found through them, at
/// most once, and skips the devices the hints already name.
#[derive(Debug, Default)]
pub struct LoopIndex {
    hinted: HashMap<PathBuf, Vec<u32>>,
    scanned: OnceLock<HashMap<PathBuf, Vec<u32>>>,
}

fn by_path(loops: impl IntoIterator<Item = (u32, PathBuf)>) -> HashMap<PathBuf, Vec<u32>> {
    let mut m: HashMap<PathBuf, Vec<u32>> = HashMap::new();
    for (n, backing) in loops {
        let v = m.entry(backing).or_default();
        if !v.contains(&n) {
            v.push(n);
        }
    }
    m
}

impl LoopIndex {
    /// Every attached device, scanned now.
    pub fn scan() -> LoopIndex {
        let idx = LoopIndex::default();
        let _ = idx.scanned.set(by_path(attached(Scan::Partitions).into_iter().map(|a| (a.number, a.backing))));
        idx
    }

    /// `hints` first, a scan only when needed.
    pub fn with_hints(hints: &[(u32, PathBuf)]) -> LoopIndex {
        LoopIndex { hinted: by_path(hints.iter().cloned()), scanned: OnceLock::new() }
    }

    fn scanned(&self) -> &HashMap<PathBuf, Vec<u32>> {
        self.scanned.get_or_init(|| {
            let known: BTreeSet<u32> = self.hinted.values().flatten().copied().collect();
            let names = partition_names(&std::fs::read_to_string("/proc/partitions").unwrap_or_default());
            by_path(
                attached_of(names, |n| if known.contains(&n) { None } else { backing_file(n) })
                    .into_iter()
                    .map(|a| (a.number, a.backing)),
            )
        })
    }

    /// An attached read-only autoclear device backed by exactly this file
    /// (same st_dev/st_ino, whole file), opened and re-checked.
    ///
    /// `path` is the image's canonical path, which is what the kernel shows
    /// as backing_file; a path that differs (other mount namespace views)
    /// only costs the sharing, never correctness.
    pub fn find(&self, backing: impl AsFd, path: &Path) -> Result<Option<LoopDevice>> {
        let st = rustix::fs::fstat(&backing).map_err(|e| Error::sys("stat", path, e))?;
        if let Some(dev) = self.hinted.get(path).and_then(|c| confirm(c, &st, path)) {
            return Ok(Some(dev));
        }
        Ok(self.scanned().get(path).and_then(|c| confirm(c, &st, path)))
    }
}

/// The first of `cands` that is an attached read-only autoclear device
/// backed by the file `st` describes, whole.
fn confirm(cands: &[u32], st: &rustix::fs::Stat, path: &Path) -> Option<LoopDevice> {
    for &n in cands {
        // ENOENT/ENXIO: gone since the scan; not an error.
        let Ok(fd) = rustix::fs::open(dev_path(n), OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty()) else {
            continue;
        };
        // Holding `fd` pins the device: autoclear waits for our close.
        let Ok(info) = sys::loop_get_status64(&fd) else { continue };
        let want = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
        if info.lo_device == st.st_dev
            && info.lo_inode == st.st_ino
            && info.lo_offset == 0
            && info.lo_sizelimit == 0
            && info.lo_flags & want == want
        {
            return Some(LoopDevice {
                number: n,
                fd,
                reused: true,
                direct_io: info.lo_flags & LO_FLAGS_DIRECT_IO != 0,
                backing: path.to_path_buf(),
            });
        }
    }
    None
}

#[derive(Clone, Copy, Debug)]
pub struct AttachOptions {
    pub read_only: bool,
    pub direct_io: bool,
    /// LOOP_CONFIGURE (5.8+) or the LOOP_SET_FD + LOOP_SET_STATUS64 pair.
    pub configure: bool,
}

/// Device numbers our own threads are configuring right now.
static IN_FLIGHT: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// Releases a number from `IN_FLIGHT` however the attempt ends.
struct Claim {
    n: u32,
    /// Taken from [`FREE_HINTS`], not handed out by the kernel: losing it
    /// means only that the hint was stale.
    hinted: bool,
}

impl Drop for Claim {
    fn drop(&mut self) {
        IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.n);
    }
}

/// Devices that existed unbound when this process first attached one,
/// lowest last (popped first). LOOP_CTL_GET_FREE returns the lowest
/// unbound device until a configure completes, so threads attaching in
/// parallel would all get the same one: with hints each takes a different
/// device without asking the kernel or reading sysfs (whose lookups
/// contend with the sysfs directories every attach and every mount
/// creates). A hint may be stale (another process bound it since): the
/// configure then fails with EBUSY and the next one is tried.
static FREE_HINTS: Mutex<Option<Vec<u32>>> = Mutex::new(None);

/// The loop devices /proc/partitions lists: those with a backing file (of
/// non-zero size), by one read, without a sysfs lookup per device.
pub fn listed_devices() -> BTreeSet<u32> {
    partition_names(&std::fs::read_to_string("/proc/partitions").unwrap_or_default())
        .iter()
        .filter_map(|name| name.strip_prefix("loop")?.parse().ok())
        .collect()
}

/// The loop devices that exist and are unbound: `/sys/block`'s loopN
/// that /proc/partitions does not list, highest first.
fn unbound_devices() -> Vec<u32> {
    let bound = listed_devices();
    let mut free: Vec<u32> = std::fs::read_dir("/sys/block")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("loop")?.parse().ok())
        .filter(|n| !bound.contains(n))
        .collect();
    free.sort_unstable_by(|a, b| b.cmp(a));
    free
}

/// A free device number no thread of ours is already configuring: a hint
/// while there are any, then LOOP_CTL_GET_FREE, skipping the numbers our
/// siblings hold (the thread then creates the next device itself). Other
/// processes can still race us (EBUSY), which the caller retries.
fn claim_free(ctl: &OwnedFd) -> Result<Claim> {
    {
        let mut hints = FREE_HINTS.lock().unwrap_or_else(|p| p.into_inner());
        let hints = hints.get_or_insert_with(unbound_devices);
        let mut held = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(m) = hints.pop() {
            if held.insert(m) {
                return Ok(Claim { n: m, hinted: true });
            }
        }
    }
    let n = sys::loop_ctl_get_free(ctl).map_err(|e| Error::sys("find a free loop device", LOOP_CONTROL, e))?;
    let mut held = IN_FLIGHT.lock().unwrap_or_else(|p| p.into_inner());
    let mut m = n;
    while held.contains(&m) || (m != n && backing_file(m).is_some()) {
        m += 1;
    }
    if m != n {
        match sys::loop_ctl_add(ctl, m) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(Error::sys(format!("create loop device {m}"), LOOP_CONTROL, e)),
        }
    }
    held.insert(m);
    Ok(Claim { n: m, hinted: false })
}

/// /dev/loop-control, opened once per process and shared by the threads
/// attaching layers.
fn control() -> Result<&'static OwnedFd> {
    static CONTROL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = CONTROL.get() {
        return Ok(fd);
    }
    let fd = rustix::fs::open(LOOP_CONTROL, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())
        .map_err(|e| Error::sys("open loop control", LOOP_CONTROL, e))?;
    // Two threads may both have opened it: one fd is kept, the other closed.
    let _ = CONTROL.set(fd);
    Ok(CONTROL.get().expect("set just above"))
}

/// Attach `backing` to a free loop device with AUTOCLEAR set.
pub fn attach(backing: impl AsFd, backing_path: &Path, opts: AttachOptions) -> Result<LoopDevice> {
    let ctl = control()?;
    let mut dio = opts.direct_io;
    let start = std::time::Instant::now();
    let mut attempt: u32 = 0;
    loop {
        if crate::interrupt::interrupted() {
            return Err(Error::Interrupted);
        }
        if start.elapsed() > ATTACH_DEADLINE {
            return Err(Error::sys(
                format!("attach loop device (gave up after {attempt} tries in {} s)", ATTACH_DEADLINE.as_secs()),
                backing_path,
                Errno::BUSY,
            ));
        }
        attempt += 1;
        let claim = claim_free(ctl)?;
        let n = claim.n;
        let path = dev_path(n);
        let mode = if opts.read_only { OFlags::RDONLY } else { OFlags::RDWR };
        let fd = match rustix::fs::open(&path, mode | OFlags::CLOEXEC, Mode::empty()) {
            Ok(fd) => fd,
            // Removed by someone between GET_FREE and open: ask again.
            Err(Errno::NOENT) | Err(Errno::NXIO) => continue,
            Err(e) => return Err(Error::sys("open loop device", &path, e)),
        };
        let flags = LO_FLAGS_AUTOCLEAR
            | if opts.read_only { LO_FLAGS_READ_ONLY } else { 0 }
            | if dio { LO_FLAGS_DIRECT_IO } else { 0 };
        let info = sys::loop_info(flags, backing_path.as_os_str().as_encoded_bytes());
        let configure = opts.configure && !NO_CONFIGURE.load(Ordering::Relaxed);
        let r = if configure {
            sys::loop_configure(&fd, &backing, &info)
        } else {
            // Held across the window; dropped whatever the outcome, since
            // a failed attach_set_fd left the device unbound.
            let _intent = SetFdIntent::write(n, &backing, backing_path)?;
            attach_set_fd(&fd, &backing, &info, backing_path)
        };
        match r {
            Ok(()) => {
                // What the kernel made of the flags: direct I/O can be
                // dropped silently (a backing file without O_DIRECT on
                // some kernels), which `mounts` and status must not hide.
                let direct_io = dio && sys::loop_get_status64(&fd).is_ok_and(|i| i.lo_flags & LO_FLAGS_DIRECT_IO != 0);
                return Ok(LoopDevice { number: n, fd, reused: false, direct_io, backing: backing_path.to_path_buf() });
            }
            // A stale hint: bound by someone since; try the next at once.
            Err(Errno::BUSY) if claim.hinted => continue,
            Err(Errno::BUSY) => {
                // Another process took it; back off a little, more each time.
                drop(claim);
                std::thread::sleep(attach_backoff(attempt));
                continue;
            }
            // A backing filesystem without O_DIRECT: buffered I/O still works.
            Err(Errno::INVAL) if dio && configure => {
                log::info!("{}: direct I/O refused, attaching with buffered I/O", backing_path.display());
                dio = false;
                continue;
            }
            // A kernel without LOOP_CONFIGURE (before 5.8, or a backport
            // that lacks it): the two-step way from now on, as util-linux
            // falls back.
            Err(e @ (Errno::INVAL | Errno::NOTTY)) if configure => {
                log::info!("LOOP_CONFIGURE refused ({}), attaching with LOOP_SET_FD", crate::error::Errno(e));
                NO_CONFIGURE.store(true, Ordering::Relaxed);
                continue;
            }
            Err(e) => return Err(Error::sys("attach loop device", &path, e).context(&format!("{}", backing_path.display()))),
        }
    }
}

/// Set once LOOP_CONFIGURE was refused as unknown: every later attach of
/// this process goes the two-step way at once.
static NO_CONFIGURE: AtomicBool = AtomicBool::new(false);

/// The pre-5.8 way. If SET_STATUS64 fails the half-attached device is
/// cleared again here. SET_STATUS64 ignores LO_FLAGS_DIRECT_IO, so direct
/// I/O is asked for with LOOP_SET_DIRECT_IO afterwards; a backing file
/// that cannot do it (EINVAL) stays buffered, as with LOOP_CONFIGURE.
fn attach_set_fd(dev: &OwnedFd, backing: impl AsFd, info: &LoopInfo64, backing_path: &Path) -> std::result::Result<(), Errno> {
    sys::loop_set_fd(dev, &backing)?;
    if let Err(e) = sys::loop_set_status64(dev, info) {
        let _ = sys::loop_clr_fd(dev);
        return Err(e);
    }
    if info.lo_flags & LO_FLAGS_DIRECT_IO != 0 {
        match sys::loop_set_direct_io(dev, true) {
            Ok(()) => {}
            Err(e @ (Errno::INVAL | Errno::NOTTY)) => {
                log::info!("{}: direct I/O refused ({}), buffered I/O", backing_path.display(), crate::error::Errno(e));
            }
            // Autoclear is set: our fd's close detaches the device.
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// LOOP_SET_FD binds the file before LOOP_SET_STATUS64 can set autoclear:
/// a process killed between the two leaves a device bound for ever (the
/// one window LOOP_CONFIGURE closes). So while it is open a file in the
/// state directory names the device, the file's dev:ino and our process;
/// the next command of the node (`sweep_half_attached`, from
/// `state::reconcile`) unbinds a device its dead writer left that way.
struct SetFdIntent(PathBuf);

fn intents_dir() -> PathBuf {
    crate::mount::state::dir().join("attaching")
}

impl SetFdIntent {
    fn write(n: u32, backing: impl AsFd, backing_path: &Path) -> Result<SetFdIntent> {
        let dir = intents_dir();
        let (pid, start) = crate::kernel::procs::me();
        let path = dir.join(format!("loop{n}.{pid}.{start}"));
        let tmp = dir.join(format!(".loop{n}.{pid}.{start}"));
        let st = rustix::fs::fstat(&backing).map_err(|e| Error::sys("stat", backing_path, e))?;
        crate::store::mkdir_p(&dir)?;
        // Whole or absent: written aside, renamed into place.
        std::fs::write(&tmp, format!("{}:{}\n", st.st_dev, st.st_ino)).map_err(|e| Error::io("write loop attach intent", &tmp, &e))?;
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(Error::io("write loop attach intent", &path, &e));
        }
        Ok(SetFdIntent(path))
    }
}

impl Drop for SetFdIntent {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// `loop<N>.<pid>.<start>` -> (N, pid, start).
fn parse_intent(name: &str) -> Option<(u32, u32, u64)> {
    let mut f = name.strip_prefix("loop")?.split('.');
    let (n, pid, start) = (f.next()?.parse().ok()?, f.next()?.parse().ok()?, f.next()?.parse().ok()?);
    f.next().is_none().then_some((n, pid, start))
}

/// Unbind the devices that processes killed inside the LOOP_SET_FD window
/// left (see `SetFdIntent`): only a device still bound to the very file
/// the intent names, without autoclear, whose writer is gone.
pub fn sweep_half_attached() {
    let dir = intents_dir();
    let Ok(rd) = std::fs::read_dir(&dir) else { return };
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        let path = ent.path();
        if let Some(tmp) = name.strip_prefix('.') {
            // A half-written intent: its process never reached SET_FD.
            if parse_intent(tmp).is_some_and(|(_, pid, start)| !crate::kernel::procs::same_process(pid, start)) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        let Some((n, pid, start)) = parse_intent(&name) else { continue };
        if crate::kernel::procs::same_process(pid, start) {
            continue;
        }
        let named = std::fs::read_to_string(&path).ok().and_then(|t| {
            let (d, i) = t.trim().split_once(':')?;
            Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?))
        });
        if let (Some((d, i)), Ok(fd)) = (named, rustix::fs::open(dev_path(n), OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())) {
            match sys::loop_get_status64(&fd) {
                Ok(info) if info.lo_device == d && info.lo_inode == i && info.lo_flags & LO_FLAGS_AUTOCLEAR == 0 => match sys::loop_clr_fd(&fd) {
                    Ok(()) => log::info!("/dev/loop{n}: detached, left half-attached by process {pid} (killed between LOOP_SET_FD and LOOP_SET_STATUS64)"),
                    Err(e) => {
                        log::warn!("/dev/loop{n}: left half-attached by process {pid}; detach: {}", crate::error::Errno(e));
                        continue;
                    }
                },
                // Unbound, rebound to something else, or finished: not ours.
                _ => {}
            }
        }
        let _ = std::fs::remove_file(&path);
    }
}

/// LOOP_CONFIGURE known to this kernel? Tried on a free device (made if
/// there is none), with a backing fd that cannot be valid, so nothing is
/// ever bound; see `sys::loop_configure_supported`.
pub fn probe_configure() -> std::result::Result<bool, Errno> {
    let ctl = rustix::fs::open(LOOP_CONTROL, OFlags::RDWR | OFlags::CLOEXEC, Mode::empty())?;
    let n = sys::loop_ctl_get_free(&ctl)?;
    let dev = rustix::fs::open(dev_path(n), OFlags::RDONLY | OFlags::CLOEXEC, Mode::empty())?;
    sys::loop_configure_supported(&dev)
}

/// Is a filesystem of type `fstype` still mounted from /dev/loop`n`?
/// ext4, xfs and erofs each keep a sysfs directory per live superblock.
pub fn superblock_alive(n: u32, fstype: &str) -> bool {
    Path::new(&format!("/sys/fs/{fstype}/loop{n}")).exists()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intent_names() {
        let cases: &[(&str, Option<(u32, u32, u64)>)] = &[
            ("loop7.1234.5678", Some((7, 1234, 5678))),
            ("loop7.1234", None),
            ("loop7.1234.5678.9", None),
            ("loopx.1.2", None),
            ("disk7.1.2", None),
        ];
        for (n, want) in cases {
            assert_eq!(parse_intent(n), *want, "{n:?}");
        }
    }

    #[test]
    fn attach_backoff_grows_to_ten_milliseconds() {
        // (attempt, lowest, highest) in microseconds: half the base and up.
        let cases: &[(u32, u64, u64)] = &[(1, 50, 100), (2, 100, 200), (4, 400, 800), (7, 3200, 6400), (8, 5000, 10_000), (500, 5000, 10_000)];
        for &(attempt, lo, hi) in cases {
            let d = attach_backoff(attempt).as_micros() as u64;
            assert!((lo..=hi).contains(&d), "attempt {attempt}: {d} us");
        }
        // The deadline is what bounds the wait, not a count of tries.
        let total: u64 = (1..=3000).map(|a| attach_backoff(a).as_micros() as u64).sum();
        assert!(total > ATTACH_DEADLINE.as_micros() as u64 / 2, "{total}");
    }

    #[test]
    fn index_from_partitions() {
        let text = "major minor  #blocks  name\n\n 254        0  264241152 vda\n   7        0       4096 loop0\n   7        3       4096 loop3\n 259        0       4096 loop12p1\n";
        let backing = |n| match n {
            0 => Some("/s/a.img".into()),
            3 => Some("/s/a.img".into()),
            _ => None, // gone since /proc/partitions was read
        };
        let idx = by_path(attached_of(partition_names(text), backing).into_iter().map(|a| (a.number, a.backing)));
        assert_eq!(idx.get(Path::new("/s/a.img")), Some(&vec![0, 3]));
        assert_eq!(idx.len(), 1);
        // Hints name a device once, however many records list it.
        let hinted = LoopIndex::with_hints(&[(5, "/s/b.img".into()), (5, "/s/b.img".into()), (6, "/s/b.img".into())]);
        assert_eq!(hinted.hinted.get(Path::new("/s/b.img")), Some(&vec![5, 6]));
        assert!(hinted.scanned.get().is_none(), "no scan before a layer misses the hints");
        // /sys/block names: whole devices only, detached ones without a backing file.
        let names = ["vda", "loop3", "loop12", "loop0", "loop-control"].map(String::from).to_vec();
        let numbers: Vec<u32> = attached_of(names, backing).iter().map(|l| l.number).collect();
        assert_eq!(numbers, [3, 0]);
    }
}
