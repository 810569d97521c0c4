//! sharedloop-kernel-surface: run a command with the syscall surface of an
//! older kernel, for the tests (`make check-kernels`; test tooling, built
//! only with `--features kernel-surface`).
//!
//! ```text
//! sharedloop-kernel-surface 4.18|5.14 [--] CMD ARGS...
//! ```
//!
//! Installs a seccomp filter and execs CMD; every child inherits it. Each
//! x86_64 system call added after the chosen release fails with ENOSYS, as
//! on that kernel, and the calls whose *arguments* were new answer the way
//! the old kernel's code does:
//!
//! - 4.18 (RHEL 8): `ioctl(fd, LOOP_CONFIGURE)` is EINVAL (the loop driver
//!   before 5.8 rejects an unknown command so).
//! - 5.14 (RHEL 9): `fsconfig(fd, FSCONFIG_SET_FD, ...)` is EINVAL
//!   (overlayfs before 6.13, and before 6.5 through the legacy fs_context
//!   adapter, refuses a layer given as a file descriptor).
//!
//! What the filter cannot hide is what lives behind calls that existed
//! already (overlayfs' `lowerdir+` on 5.14, erofs on an image file): the
//! tests expect those as they are here. The release string is faked by
//! `scripts/kernel-surface`, which bind-mounts it over
//! /proc/sys/kernel/osrelease and then runs this.

#![deny(unsafe_code)]

#[cfg(not(target_arch = "x86_64"))]
compile_error!("sharedloop-kernel-surface knows x86_64's system call numbers only");

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitCode};

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule, TargetArch,
};

/// ioctl LOOP_CONFIGURE (5.8), `_IO(0x4C, 0x0A)`.
const LOOP_CONFIGURE: u64 = 0x4C0A;
/// fsconfig command FSCONFIG_SET_FD.
const FSCONFIG_SET_FD: u64 = 5;

/// x86_64 system calls of 5.15 and later (newest last). Numbers libc does
/// not name yet are literal, from arch/x86/entry/syscalls/syscall_64.tbl.
const AFTER_5_14: &[(&str, i64)] = &[
    ("process_mrelease", libc::SYS_process_mrelease), // 5.15
    ("futex_waitv", libc::SYS_futex_waitv),           // 5.16
    ("set_mempolicy_home_node", libc::SYS_set_mempolicy_home_node), // 5.17
    ("cachestat", 451),                               // 6.5
    ("fchmodat2", libc::SYS_fchmodat2),               // 6.6
    ("map_shadow_stack", 453),                        // 6.6
    ("futex_wake", 454),                              // 6.7
    ("futex_wait", 455),                              // 6.7
    ("futex_requeue", 456),                           // 6.7
    ("statmount", 457),                               // 6.8
    ("listmount", 458),                               // 6.8
    ("lsm_get_self_attr", 459),                       // 6.8
    ("lsm_set_self_attr", 460),                       // 6.8
    ("lsm_list_modules", 461),                        // 6.8
    ("mseal", libc::SYS_mseal),                       // 6.10
    // uretprobe (335, 6.11) is left alone: only the kernel's own uretprobe
    // trampoline calls it, and filtering it breaks uretprobes.
    ("setxattrat", 463),                              // 6.13
    ("getxattrat", 464),                              // 6.13
    ("listxattrat", 465),                             // 6.13
    ("removexattrat", 466),                           // 6.13
    ("open_tree_attr", 467),                          // 6.15
    ("file_getattr", 468),                            // 6.17
    ("file_setattr", 469),                            // 6.17
];

/// x86_64 system calls of 4.19 to 5.14.
const AFTER_4_18: &[(&str, i64)] = &[
    ("pidfd_send_signal", libc::SYS_pidfd_send_signal), // 5.1
    ("io_uring_setup", libc::SYS_io_uring_setup),       // 5.1
    ("io_uring_enter", libc::SYS_io_uring_enter),       // 5.1
    ("io_uring_register", libc::SYS_io_uring_register), // 5.1
    ("open_tree", libc::SYS_open_tree),                 // 5.2
    ("move_mount", libc::SYS_move_mount),               // 5.2
    ("fsopen", libc::SYS_fsopen),                       // 5.2
    ("fsconfig", libc::SYS_fsconfig),                   // 5.2
    ("fsmount", libc::SYS_fsmount),                     // 5.2
    ("fspick", libc::SYS_fspick),                       // 5.2
    ("pidfd_open", libc::SYS_pidfd_open),               // 5.3
    ("clone3", libc::SYS_clone3),                       // 5.3
    ("openat2", libc::SYS_openat2),                     // 5.6
    ("pidfd_getfd", libc::SYS_pidfd_getfd),             // 5.6
    ("faccessat2", libc::SYS_faccessat2),               // 5.8
    ("close_range", libc::SYS_close_range),             // 5.9
    ("process_madvise", libc::SYS_process_madvise),     // 5.10
    ("epoll_pwait2", libc::SYS_epoll_pwait2),           // 5.11
    ("mount_setattr", libc::SYS_mount_setattr),         // 5.12
    ("landlock_create_ruleset", libc::SYS_landlock_create_ruleset), // 5.13
    ("landlock_add_rule", libc::SYS_landlock_add_rule), // 5.13
    ("landlock_restrict_self", libc::SYS_landlock_restrict_self), // 5.13
    ("quotactl_fd", libc::SYS_quotactl_fd),             // 5.14
    ("memfd_secret", libc::SYS_memfd_secret),           // 5.14
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Surface {
    Rhel8,
    Rhel9,
}

impl Surface {
    fn parse(s: &str) -> Option<Surface> {
        match s {
            "4.18" => Some(Surface::Rhel8),
            "5.14" => Some(Surface::Rhel9),
            _ => None,
        }
    }

    /// The system calls that must not exist.
    fn missing(self) -> Vec<(&'static str, i64)> {
        let mut v = AFTER_5_14.to_vec();
        if self == Surface::Rhel8 {
            v.extend_from_slice(AFTER_4_18);
        }
        v
    }

    /// (system call, argument 1, what it stands for): calls that exist but
    /// are EINVAL with that argument on this kernel.
    fn refused(self) -> Vec<(i64, u64, &'static str)> {
        match self {
            Surface::Rhel8 => vec![(libc::SYS_ioctl, LOOP_CONFIGURE, "ioctl LOOP_CONFIGURE")],
            Surface::Rhel9 => vec![(libc::SYS_fsconfig, FSCONFIG_SET_FD, "fsconfig FSCONFIG_SET_FD")],
        }
    }
}

fn filters(surface: Surface) -> Result<Vec<BpfProgram>, seccompiler::Error> {
    let arch = TargetArch::x86_64;
    let gone: BTreeMap<i64, Vec<SeccompRule>> = surface.missing().into_iter().map(|(_, nr)| (nr, vec![])).collect();
    let enosys = SeccompFilter::new(gone, SeccompAction::Allow, SeccompAction::Errno(libc::ENOSYS as u32), arch)?;
    let mut refused: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (nr, arg1, _) in surface.refused() {
        // Both commands are ints (ioctl's is an unsigned long that the
        // kernel truncates for these drivers): compare the low 32 bits.
        let c = SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, arg1)?;
        refused.entry(nr).or_default().push(SeccompRule::new(vec![c])?);
    }
    let einval = SeccompFilter::new(refused, SeccompAction::Allow, SeccompAction::Errno(libc::EINVAL as u32), arch)?;
    Ok(vec![enosys.try_into()?, einval.try_into()?])
}

fn usage() -> ExitCode {
    eprintln!("usage: sharedloop-kernel-surface 4.18|5.14 [--] CMD ARGS...");
    eprintln!("  4.18: RHEL 8's system calls (no new mount API, openat2, LOOP_CONFIGURE, clone3, ...)");
    eprintln!("  5.14: RHEL 9's (nothing after 5.14; overlayfs refuses layers given as fds)");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(surface) = args.next().and_then(|s| s.to_str().and_then(Surface::parse)) else {
        return usage();
    };
    let mut rest: Vec<_> = args.collect();
    if rest.first().is_some_and(|a| a == "--") {
        rest.remove(0);
    }
    if rest.is_empty() {
        return usage();
    }
    let progs = match filters(surface) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("sharedloop-kernel-surface: build the seccomp filter: {e}");
            return ExitCode::from(125);
        }
    };
    for p in &progs {
        if let Err(e) = seccompiler::apply_filter(p) {
            eprintln!("sharedloop-kernel-surface: install the seccomp filter: {e}");
            return ExitCode::from(125);
        }
    }
    let e = Command::new(&rest[0]).args(&rest[1..]).exec();
    eprintln!("sharedloop-kernel-surface: {}: {e}", rest[0].to_string_lossy());
    ExitCode::from(if e.kind() == std::io::ErrorKind::NotFound { 127 } else { 126 })
}
