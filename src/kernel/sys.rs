//! Every `unsafe` block of the crate lives here (the rest of the crate
//! denies `unsafe_code`): the loop driver's ioctls (rustix wraps none of
//! them), open-file-description locks (rustix's `fcntl_lock` takes
//! process-owned POSIX locks, which would die with the helper; ours must
//! live as long as the loop device that holds the file), and the
//! between-fork-and-exec hook that ties a child command's life to ours.
//!
//! The API is safe: fds in as `AsFd`, plain Rust values out, errno as
//! `rustix::io::Errno`.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use rustix::io::Errno;

// <linux/loop.h>, from linux-raw-sys (generated from the kernel's uapi
// headers) rather than copied by hand.
use linux_raw_sys::loop_device as uapi;

pub use uapi::loop_info64 as LoopInfo64;

const LOOP_SET_FD: libc::c_ulong = uapi::LOOP_SET_FD as libc::c_ulong;
const LOOP_CLR_FD: libc::c_ulong = uapi::LOOP_CLR_FD as libc::c_ulong;
const LOOP_SET_STATUS64: libc::c_ulong = uapi::LOOP_SET_STATUS64 as libc::c_ulong;
const LOOP_GET_STATUS64: libc::c_ulong = uapi::LOOP_GET_STATUS64 as libc::c_ulong;
const LOOP_SET_DIRECT_IO: libc::c_ulong = uapi::LOOP_SET_DIRECT_IO as libc::c_ulong;
const LOOP_CONFIGURE: libc::c_ulong = uapi::LOOP_CONFIGURE as libc::c_ulong;
const LOOP_CTL_ADD: libc::c_ulong = uapi::LOOP_CTL_ADD as libc::c_ulong;
const LOOP_CTL_GET_FREE: libc::c_ulong = uapi::LOOP_CTL_GET_FREE as libc::c_ulong;

pub const LO_FLAGS_READ_ONLY: u32 = uapi::LO_FLAGS_READ_ONLY as u32;
pub const LO_FLAGS_AUTOCLEAR: u32 = uapi::LO_FLAGS_AUTOCLEAR as u32;
pub const LO_FLAGS_DIRECT_IO: u32 = uapi::LO_FLAGS_DIRECT_IO as u32;

/// An all-zero `struct loop_info64` with `flags` and the name losetup
/// shows (informational only, cut at 63 bytes).
pub fn loop_info(flags: u32, name: &[u8]) -> LoopInfo64 {
    let mut file_name = [0u8; uapi::LO_NAME_SIZE as usize];
    let n = name.len().min(file_name.len() - 1);
    file_name[..n].copy_from_slice(&name[..n]);
    LoopInfo64 {
        lo_device: 0,
        lo_inode: 0,
        lo_rdevice: 0,
        lo_offset: 0,
        lo_sizelimit: 0,
        lo_number: 0,
        lo_encrypt_type: 0,
        lo_encrypt_key_size: 0,
        lo_flags: flags,
        lo_file_name: file_name,
        lo_crypt_name: [0; uapi::LO_NAME_SIZE as usize],
        lo_encrypt_key: [0; uapi::LO_KEY_SIZE as usize],
        lo_init: [0; 2],
    }
}

fn check(ret: libc::c_int) -> Result<libc::c_int, Errno> {
    if ret < 0 {
        Err(Errno::from_raw_os_error(std::io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO)))
    } else {
        Ok(ret)
    }
}

/// LOOP_CTL_GET_FREE on /dev/loop-control: the number of a free device,
/// created if needed.
pub fn loop_ctl_get_free(ctl: impl AsFd) -> Result<u32, Errno> {
    // SAFETY: LOOP_CTL_GET_FREE takes no argument; the fd is borrowed and
    // valid for the duration of the call.
    let n = check(unsafe { libc::ioctl(ctl.as_fd().as_raw_fd(), LOOP_CTL_GET_FREE) })?;
    Ok(n as u32)
}

/// LOOP_CTL_ADD: create /dev/loopN (EEXIST if it is there already).
pub fn loop_ctl_add(ctl: impl AsFd, n: u32) -> Result<(), Errno> {
    // SAFETY: LOOP_CTL_ADD takes the device index as an integer argument;
    // the fd is borrowed and valid.
    check(unsafe { libc::ioctl(ctl.as_fd().as_raw_fd(), LOOP_CTL_ADD, n as libc::c_ulong) })?;
    Ok(())
}

/// LOOP_CONFIGURE: bind `backing` and set every flag in one atomic call.
pub fn loop_configure(dev: impl AsFd, backing: impl AsFd, info: &LoopInfo64) -> Result<(), Errno> {
    loop_configure_raw(dev, backing.as_fd().as_raw_fd() as u32, info)
}

/// Does this kernel know LOOP_CONFIGURE (5.8)? Asked of a device with a
/// backing fd that cannot be valid: a kernel that has the ioctl fails the
/// fd lookup (EBADF) and binds nothing; one without it says EINVAL or
/// ENOTTY, which is how util-linux tells too. Any other errno is returned.
pub fn loop_configure_supported(dev: impl AsFd) -> Result<bool, Errno> {
    match loop_configure_raw(dev, u32::MAX, &loop_info(0, b"")) {
        Err(Errno::BADF) => Ok(true),
        Err(Errno::INVAL) | Err(Errno::NOTTY) => Ok(false),
        Err(e) => Err(e),
        // Cannot happen (no fd -1); nothing was bound to a valid file.
        Ok(()) => Ok(true),
    }
}

fn loop_configure_raw(dev: impl AsFd, fd: u32, info: &LoopInfo64) -> Result<(), Errno> {
    let cfg = uapi::loop_config { fd, block_size: 0, info: *info, __reserved: [0; 8] };
    // SAFETY: `cfg` is a `struct loop_config` as the uapi header lays it
    // out, alive across the call; the kernel only reads it. The device fd
    // is borrowed.
    check(unsafe { libc::ioctl(dev.as_fd().as_raw_fd(), LOOP_CONFIGURE, &cfg as *const uapi::loop_config) })?;
    Ok(())
}

/// LOOP_SET_DIRECT_IO: LOOP_SET_STATUS64 ignores LO_FLAGS_DIRECT_IO, so
/// on the pre-5.8 way direct I/O is switched on with this (4.10+) after
/// SET_FD. EINVAL: the backing file's filesystem cannot do it.
pub fn loop_set_direct_io(dev: impl AsFd, on: bool) -> Result<(), Errno> {
    // SAFETY: LOOP_SET_DIRECT_IO takes an integer argument; the fd is
    // borrowed and valid.
    check(unsafe { libc::ioctl(dev.as_fd().as_raw_fd(), LOOP_SET_DIRECT_IO, on as libc::c_ulong) })?;
    Ok(())
}

/// LOOP_SET_FD, the pre-5.8 first half of attaching.
pub fn loop_set_fd(dev: impl AsFd, backing: impl AsFd) -> Result<(), Errno> {
    // SAFETY: LOOP_SET_FD takes the backing fd as an integer argument; both
    // fds are borrowed and valid.
    check(unsafe {
        libc::ioctl(
            dev.as_fd().as_raw_fd(),
            LOOP_SET_FD,
            backing.as_fd().as_raw_fd() as libc::c_ulong,
        )
    })?;
    Ok(())
}

/// LOOP_SET_STATUS64, the pre-5.8 second half of attaching.
pub fn loop_set_status64(dev: impl AsFd, info: &LoopInfo64) -> Result<(), Errno> {
    // SAFETY: `info` is a valid `struct loop_info64` the kernel only reads.
    check(unsafe {
        libc::ioctl(dev.as_fd().as_raw_fd(), LOOP_SET_STATUS64, info as *const LoopInfo64)
    })?;
    Ok(())
}

/// LOOP_GET_STATUS64: what the device is bound to (ENXIO if nothing).
pub fn loop_get_status64(dev: impl AsFd) -> Result<LoopInfo64, Errno> {
    let mut info = loop_info(0, b"");
    // SAFETY: `info` is a writable `struct loop_info64` the kernel fills;
    // it outlives the call.
    check(unsafe {
        libc::ioctl(dev.as_fd().as_raw_fd(), LOOP_GET_STATUS64, &mut info as *mut LoopInfo64)
    })?;
    Ok(info)
}

/// LOOP_CLR_FD: only used to undo a half-done LOOP_SET_FD attach.
pub fn loop_clr_fd(dev: impl AsFd) -> Result<(), Errno> {
    // SAFETY: LOOP_CLR_FD takes no argument; the fd is borrowed.
    check(unsafe { libc::ioctl(dev.as_fd().as_raw_fd(), LOOP_CLR_FD, 0 as libc::c_ulong) })?;
    Ok(())
}

/// Try to take a whole-file write lock owned by the open file description
/// (F_OFD_SETLK). Such a lock lives as long as the description does: when
/// that description is the loop device's backing file, exactly as long as
/// the device stays attached, on this node and (over NFSv4/Lustre/GPFS
/// locking) across nodes. EAGAIN/EACCES: someone else holds it.
pub fn ofd_try_write_lock(fd: impl AsFd) -> Result<(), Errno> {
    let mut fl: libc::flock = flock_whole_file(libc::F_WRLCK);
    // SAFETY: `fl` is a valid `struct flock` for the call's duration; with
    // F_OFD_SETLK the kernel reads it (and requires l_pid == 0).
    check(unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_OFD_SETLK, &mut fl as *mut libc::flock) })?;
    Ok(())
}

/// A shared (read) OFD lock on the whole file: "in use", for `rm` and `gc`
/// on this or another node, as long as the description lives.
pub fn ofd_try_read_lock(fd: impl AsFd) -> Result<(), Errno> {
    let mut fl: libc::flock = flock_whole_file(libc::F_RDLCK);
    // SAFETY: as in ofd_try_write_lock; the kernel reads `fl`.
    check(unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_OFD_SETLK, &mut fl as *mut libc::flock) })?;
    Ok(())
}

/// Would a write lock be granted? Returns false if another description
/// holds a conflicting lock (F_OFD_GETLK).
pub fn ofd_write_lock_free(fd: impl AsFd) -> Result<bool, Errno> {
    let mut fl: libc::flock = flock_whole_file(libc::F_WRLCK);
    // SAFETY: as above; F_OFD_GETLK writes the conflicting lock (if any)
    // back into `fl`, which we own.
    check(unsafe { libc::fcntl(fd.as_fd().as_raw_fd(), libc::F_OFD_GETLK, &mut fl as *mut libc::flock) })?;
    Ok(fl.l_type == libc::F_UNLCK as libc::c_short)
}

fn flock_whole_file(ty: libc::c_int) -> libc::flock {
    // SAFETY: `struct flock` is plain data; all-zero is a valid value
    // (l_start = l_len = 0 means the whole file, l_pid must be 0 for OFD).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = ty as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl
}

/// Make the kernel SIGKILL `cmd`'s process as soon as we die, even of
/// SIGKILL (PR_SET_PDEATHSIG, set in the child between fork and exec; it
/// survives execve). So a killed sharedloop never leaves a mkfs writing
/// into the store for a `gc` to delete under it.
///
/// The signal fires when the *thread* that forked the child exits, not
/// the process. That is what we want here: the command runner spawns and
/// then waits for the child on the same thread, so that thread outlives
/// the child unless the whole process dies (or the thread unwinds, and
/// then the child should go too).
///
/// It reaches the child only, not its own children: a command that forks
/// must take them down itself (the xfs copy runs in a PID namespace whose
/// init dies with it).
pub fn die_with_parent(cmd: &mut Command) {
    let parent = rustix::process::getpid();
    // SAFETY: the closure runs in the forked child before exec, where only
    // async-signal-safe operations are allowed. It makes two raw system
    // calls through rustix (prctl, getppid), allocates nothing and takes
    // no lock; `io::Error::from_raw_os_error` does not allocate. It
    // captures only a `Pid` (Copy).
    unsafe {
        cmd.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            // The classic race: if we died between fork and the prctl, the
            // signal never comes and the child now belongs to a reaper.
            // Returning an error makes the child exit at once, without exec.
            if rustix::process::getppid() != Some(parent) {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_match_uapi() {
        // sizeof(struct loop_info64) == 232, sizeof(struct loop_config) == 304
        assert_eq!(std::mem::size_of::<LoopInfo64>(), 232);
        assert_eq!(std::mem::size_of::<uapi::loop_config>(), 304);
        let i = loop_info(LO_FLAGS_AUTOCLEAR, &[b'x'; 100]);
        assert_eq!(&i.lo_file_name[..63], &[b'x'; 63][..]);
        assert_eq!(i.lo_file_name[63], 0);
        assert_eq!(i.lo_flags, 4);
    }

    #[test]
    fn ofd_lock_conflicts_between_descriptions() {
        let dir = std::env::temp_dir().join(format!("sl-ofd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f");
        std::fs::write(&p, b"x").unwrap();
        let a = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let b = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        ofd_try_write_lock(&a).unwrap();
        // Same process, other description: refused (POSIX locks would allow it).
        assert_eq!(ofd_try_write_lock(&b), Err(Errno::AGAIN));
        assert!(!ofd_write_lock_free(&b).unwrap());
        drop(a);
        assert!(ofd_write_lock_free(&b).unwrap());
        ofd_try_write_lock(&b).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
