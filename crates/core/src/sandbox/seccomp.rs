//! The seccomp filter of a serving daemon: an allowlist of the system calls
//! the serve loop, the vring threads and the worker pool make once the image
//! is open, the key read and the socket listening (found with `strace -f -c`
//! on the test suite and the QEMU end-to-end test; see README "Sandbox").
//!
//! A call outside the list never runs: SECCOMP_RET_TRAP raises SIGSYS, whose
//! handler names the call on stderr and exits with status 159 (128 + SIGSYS).
//! Why not EPERM: a compromised daemon could probe with failing calls, and a
//! missing entry would surface as odd I/O errors in the guest instead of a
//! loud, named failure. `--sandbox seccomp-log` allows everything and has
//! the kernel log what the filter would have trapped (SECCOMP_RET_LOG).

use std::collections::BTreeMap;
use std::os::fd::RawFd;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{Network, SandboxError};

/// Exit status after a trapped call: 128 + SIGSYS, as a shell reports it.
pub const TRAPPED_EXIT: i32 = 128 + libc::SIGSYS;

/// System calls allowed without conditions, by name (for reports and tests).
pub fn allowed() -> Vec<(&'static str, i64)> {
    macro_rules! calls {
        ($($name:ident),* $(,)?) => {
            vec![$((stringify!($name), libc::$name as i64)),*]
        };
    }
    let mut v = calls![
        // data path: image I/O, FLUSH, DISCARD
        SYS_pread64,
        SYS_pwrite64,
        SYS_preadv,
        SYS_pwritev,
        SYS_fdatasync,
        SYS_fsync,
        SYS_msync,
        SYS_fallocate,
        // the asynchronous path: a ring per queue, set up per connection
        // (restricted to read/write/fsync/fallocate before it is enabled)
        SYS_io_uring_setup,
        SYS_io_uring_enter,
        SYS_io_uring_register,
        SYS_lseek,
        // vhost-user messages, eventfds, epoll, the signal thread's pipe
        SYS_read,
        SYS_write,
        SYS_readv,
        SYS_writev,
        SYS_recvmsg,
        SYS_sendmsg,
        SYS_recvfrom,
        SYS_sendto,
        SYS_accept4,
        SYS_shutdown,
        SYS_getsockopt,
        SYS_eventfd2,
        SYS_epoll_create1,
        SYS_epoll_ctl,
        SYS_epoll_pwait,
        SYS_ppoll,
        // an NBD queue's timer: the deadline of its oldest unanswered command
        SYS_timerfd_create,
        SYS_timerfd_settime,
        SYS_close,
        SYS_dup,
        SYS_fstat,
        SYS_statx,
        SYS_newfstatat,
        // guest memory (memfds from the VMM), allocator, key pages
        SYS_munmap,
        SYS_mremap,
        SYS_madvise,
        SYS_brk,
        SYS_mlock,
        SYS_munlock,
        // the inflight region (GET_INFLIGHT_FD: a memfd of the right size)
        SYS_memfd_create,
        SYS_ftruncate,
        // threads (creation is `clone` with CLONE_THREAD, below)
        SYS_futex,
        SYS_set_robust_list,
        SYS_rseq,
        SYS_sigaltstack,
        SYS_rt_sigprocmask,
        SYS_rt_sigreturn,
        SYS_rt_sigaction,
        SYS_sched_getaffinity,
        SYS_sched_yield,
        SYS_gettid,
        SYS_getpid,
        SYS_getrandom,
        // a panic's backtrace (RUST_BACKTRACE) prints paths relative to it
        SYS_getcwd,
        SYS_clock_gettime,
        SYS_clock_nanosleep,
        SYS_nanosleep,
        SYS_restart_syscall,
        SYS_exit,
        SYS_exit_group,
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend(calls![SYS_epoll_wait, SYS_poll]);
    v
}

/// How many system calls the filter lets through (some only with certain
/// arguments), clone3 (made to fail with ENOSYS) included.
pub fn allowed_count(net: Option<Network>) -> usize {
    allowed().len() + conditional(&[0], net).map_or(0, |c| c.len()) + 1
}

/// (name, number, rules): the call is allowed when any rule matches.
type Conditional = (&'static str, i64, Vec<SeccompRule>);

/// Calls allowed only with some arguments: (name, number, rules; any rule
/// matching allows the call).
///
/// `socket_dirs`: the directory fds through which the sockets are removed at
/// exit (unlinkat on those fds only: no other file can be deleted).
/// `net`: where lost NBD connections are made again (socket of that family
/// only, and connect), or a Ceph cluster (TCP sockets, see `Network::Rbd`).
fn conditional(
    socket_dirs: &[RawFd],
    net: Option<Network>,
) -> Result<Vec<Conditional>, SandboxError> {
    let eq = |arg: u8, value: u64| {
        SeccompCondition::new(arg, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, value)
    };
    let rule = |conds| SeccompRule::new(conds).map_err(SandboxError::seccomp);
    let thread = CLONE_THREAD_FLAG;
    let thread_only = SeccompCondition::new(
        0,
        SeccompCmpArgLen::Qword,
        SeccompCmpOp::MaskedEq(thread),
        thread,
    )
    .map_err(SandboxError::seccomp)?;
    let c =
        |r: Result<SeccompCondition, seccompiler::BackendError>| r.map_err(SandboxError::seccomp);
    let mut v = vec![
        // Threads yes, new processes no (fork, vfork, posix_spawn).
        ("clone", libc::SYS_clone, vec![rule(vec![thread_only])?]),
        // Thread names only.
        (
            "prctl",
            libc::SYS_prctl,
            vec![rule(vec![c(eq(0, libc::PR_SET_NAME as u64))?])?],
        ),
        // Memory, never executable: no code can be made at run time.
        ("mmap", libc::SYS_mmap, vec![rule(vec![not_exec()?])?]),
        (
            "mprotect",
            libc::SYS_mprotect,
            vec![rule(vec![not_exec()?])?],
        ),
        // The commands std, vhost and the inflight region use; not
        // F_SETOWN/F_SETSIG (they could signal other processes), leases or
        // notifications.
        (
            "fcntl",
            libc::SYS_fcntl,
            FCNTL_COMMANDS
                .iter()
                .map(|&cmd| rule(vec![c(eq(1, cmd as u64))?]))
                .collect::<Result<_, _>>()?,
        ),
        // abort() signals its own thread: allowed for this process only, so
        // a panic that aborts shows as SIGABRT, not as a trapped call.
        (
            "tgkill",
            libc::SYS_tgkill,
            vec![rule(vec![c(eq(0, std::process::id() as u64))?])?],
        ),
        // DISCARD on a block device; std's set_nonblocking and FIOCLEX.
        (
            "ioctl",
            libc::SYS_ioctl,
            vec![
                rule(vec![c(eq(1, BLKDISCARD))?])?,
                rule(vec![c(eq(1, libc::FIONBIO))?])?,
                rule(vec![c(eq(1, libc::FIOCLEX))?])?,
            ],
        ),
    ];
    if !socket_dirs.is_empty() {
        // One rule per directory (the control socket may live in another
        // directory than the vhost-user socket): any of them matches.
        let rules = socket_dirs
            .iter()
            .map(|dir| rule(vec![c(eq(0, *dir as u64))?]))
            .collect::<Result<Vec<_>, _>>()?;
        v.push(("unlinkat", libc::SYS_unlinkat, rules));
    }
    if net == Some(Network::Rbd) {
        // librados' messenger: socket(AF_INET or AF_INET6, SOCK_STREAM with
        // any of SOCK_CLOEXEC/SOCK_NONBLOCK, 0 or IPPROTO_TCP).
        let stream = SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xf),
            libc::SOCK_STREAM as u64,
        )
        .map_err(SandboxError::seccomp)?;
        let family = |f: i32| -> Result<SeccompRule, SandboxError> {
            rule(vec![c(eq(0, f as u64))?, stream.clone()])
        };
        v.push((
            "socket",
            libc::SYS_socket,
            vec![family(libc::AF_INET)?, family(libc::AF_INET6)?],
        ));
        // No rule: allowed whatever their arguments (they act on the
        // sockets above; connect cannot be narrowed by address here,
        // Landlock narrows it to TCP with --sandbox full).
        for (name, nr) in [
            ("connect", libc::SYS_connect),
            ("setsockopt", libc::SYS_setsockopt),
            ("getsockname", libc::SYS_getsockname),
            ("getpeername", libc::SYS_getpeername),
            ("uname", libc::SYS_uname),
        ] {
            v.push((name, nr, vec![]));
        }
    }
    if let Some(Network::Nbd(peer)) = net {
        // A new connection to the NBD server's address, resolved before
        // the sandbox: a stream socket of its family, exactly as
        // libnbd::Endpoint makes it, and connect(2). connect cannot be
        // narrowed by address here (it is in memory); Landlock narrows
        // TCP to the port with --sandbox full.
        let stream = (libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) as u64;
        v.push((
            "socket",
            libc::SYS_socket,
            vec![rule(vec![
                c(eq(0, peer.family as u64))?,
                c(eq(1, stream))?,
                c(eq(2, 0))?,
            ])?],
        ));
        // No rule: allowed whatever its arguments.
        v.push(("connect", libc::SYS_connect, vec![]));
        if peer.tls {
            // The handshake reads the PSK file or the certificates (libnbd
            // opens them anew each time): read-only opens, never creating,
            // truncating or writing. Which files seccomp cannot see (the
            // path is in memory); Landlock narrows them with --sandbox full.
            let writes = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND) as u64;
            let read_only = SeccompCondition::new(
                2,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::MaskedEq(writes),
                0,
            )
            .map_err(SandboxError::seccomp)?;
            v.push(("openat", libc::SYS_openat, vec![rule(vec![read_only])?]));
            // libnbd asks whether each certificate file exists first.
            v.push(("faccessat", libc::SYS_faccessat, vec![]));
            v.push(("faccessat2", libc::SYS_faccessat2, vec![]));
            #[cfg(target_arch = "x86_64")]
            v.push(("access", libc::SYS_access, vec![]));
        }
    }
    Ok(v)
}

const CLONE_THREAD_FLAG: u64 = libc::CLONE_THREAD as u64;

/// The OFD lock commands: a migration hands the image's locks over while
/// serving (volume/lock.rs).
const FCNTL_COMMANDS: [libc::c_int; 9] = [
    libc::F_GETFD,
    libc::F_SETFD,
    libc::F_GETFL,
    libc::F_SETFL,
    libc::F_DUPFD_CLOEXEC,
    libc::F_ADD_SEALS,
    libc::F_GET_SEALS,
    libc::F_OFD_GETLK,
    libc::F_OFD_SETLK,
];

/// The `prot` argument (2) of mmap/mprotect has no PROT_EXEC.
fn not_exec() -> Result<SeccompCondition, SandboxError> {
    let exec = libc::PROT_EXEC as u64;
    SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::MaskedEq(exec), 0)
        .map_err(SandboxError::seccomp)
}
/// _IO(0x12, 119), as in volume/mod.rs.
const BLKDISCARD: u64 = 0x1277;

/// What the filter does with a call outside the allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnViolation {
    /// SIGSYS: the handler names the call and exits (the call never runs).
    Trap,
    /// Run the call, but have the kernel log it (debugging the allowlist).
    Log,
}

/// The allowlist filter, compiled for this CPU architecture.
pub fn allowlist(
    on_violation: OnViolation,
    socket_dirs: &[RawFd],
    net: Option<Network>,
) -> Result<BpfProgram, SandboxError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, nr) in allowed() {
        rules.insert(nr, vec![]);
    }
    for (_, nr, r) in conditional(socket_dirs, net)? {
        rules.insert(nr, r);
    }
    // clone3 passes its flags in memory, where seccomp cannot look: it is
    // "allowed" here and turned into ENOSYS by `no_clone3`, so glibc falls
    // back to clone(2), whose flags the rule above checks.
    rules.insert(libc::SYS_clone3, vec![]);
    let mismatch = match on_violation {
        OnViolation::Trap => SeccompAction::Trap,
        OnViolation::Log => SeccompAction::Log,
    };
    compile(rules, mismatch, SeccompAction::Allow)
}

/// clone3 → ENOSYS (everything else passes to the allowlist filter).
pub fn no_clone3() -> Result<BpfProgram, SandboxError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    compile(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
    )
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
) -> Result<BpfProgram, SandboxError> {
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(SandboxError::seccomp)?;
    SeccompFilter::new(rules, mismatch, matched, arch)
        .and_then(BpfProgram::try_from)
        .map_err(SandboxError::seccomp)
}

/// Installs both filters on every thread of the process (TSYNC) and the
/// SIGSYS handler that reports a trapped call.
pub fn install(
    on_violation: OnViolation,
    socket_dirs: &[RawFd],
    net: Option<Network>,
) -> Result<(), SandboxError> {
    let allow = allowlist(on_violation, socket_dirs, net)?;
    let clone3 = no_clone3()?;
    if on_violation == OnViolation::Trap {
        install_sigsys_handler()?;
    }
    // clone3's filter first: installing a filter calls prctl(NO_NEW_PRIVS)
    // and seccomp(2), which the allowlist leaves out.
    seccompiler::apply_filter_all_threads(&clone3)
        .and_then(|()| seccompiler::apply_filter_all_threads(&allow))
        .map_err(|e| SandboxError::Install(e.to_string()))
}

fn install_sigsys_handler() -> Result<(), SandboxError> {
    // SAFETY: sigaction is plain data; the handler only calls
    // async-signal-safe functions (write, _exit).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(SandboxError::Install(format!(
                "cannot install the SIGSYS handler: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Byte offset of `si_syscall` in a 64-bit siginfo_t: signo, errno, code,
/// padding (16 bytes), then the SIGSYS member {call_addr: *void, syscall: int}.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers,
    // and for SECCOMP_RET_TRAP it fills the SIGSYS member read here.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read()
    };
    let mut msg = [0u8; 160];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(msg.len() - len);
        msg[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    put(b"cryptblk: the seccomp sandbox stopped system call ");
    let mut digits = [0u8; 12];
    let mut i = digits.len();
    let mut v = nr.unsigned_abs();
    loop {
        i -= 1;
        digits[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    put(&digits[i..]);
    put(b" (see ausyscall); exiting. --sandbox none works around it: please report it\n");
    // SAFETY: write and _exit are async-signal-safe; msg outlives the call.
    unsafe {
        libc::write(libc::STDERR_FILENO, msg.as_ptr().cast(), len);
        libc::_exit(TRAPPED_EXIT);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_compile_and_leave_out_process_creation_and_file_opening() {
        assert!(!allowlist(OnViolation::Trap, &[3, 4], None)
            .unwrap()
            .is_empty());
        let peer = Network::Nbd(super::super::NbdPeer {
            family: libc::AF_INET,
            tcp_port: Some(10809),
            tls: false,
        });
        let tls_peer = Network::Nbd(super::super::NbdPeer {
            family: libc::AF_UNIX,
            tcp_port: None,
            tls: true,
        });
        assert!(!allowlist(OnViolation::Trap, &[3], Some(peer))
            .unwrap()
            .is_empty());
        let names = |nbd| {
            conditional(&[3], nbd)
                .unwrap()
                .iter()
                .map(|(n, _, _)| *n)
                .collect::<Vec<_>>()
        };
        assert!(!names(None).contains(&"socket") && !names(None).contains(&"connect"));
        assert!(names(Some(peer)).contains(&"socket") && names(Some(peer)).contains(&"connect"));
        // Opening files only for a TLS handshake, and then read-only.
        assert!(!names(Some(peer)).contains(&"openat"));
        assert!(names(Some(tls_peer)).contains(&"openat"));
        assert!(!allowlist(OnViolation::Trap, &[3], Some(tls_peer))
            .unwrap()
            .is_empty());
        let rbd = names(Some(Network::Rbd));
        assert!(
            rbd.contains(&"socket") && rbd.contains(&"connect"),
            "{rbd:?}"
        );
        assert!(
            !rbd.contains(&"bind") && !rbd.contains(&"listen"),
            "{rbd:?}"
        );
        assert!(!allowlist(OnViolation::Trap, &[3], Some(Network::Rbd))
            .unwrap()
            .is_empty());
        assert!(!no_clone3().unwrap().is_empty());
        let names: Vec<&str> = allowed().iter().map(|(n, _)| *n).collect();
        for forbidden in [
            "SYS_execve",
            "SYS_execveat",
            "SYS_fork",
            "SYS_vfork",
            "SYS_openat",
            "SYS_open",
            "SYS_ptrace",
            "SYS_bind",
            "SYS_listen",
            "SYS_kill",
            "SYS_mount",
            "SYS_setuid",
        ] {
            assert!(!names.contains(&forbidden), "{forbidden} is allowed");
        }
        let nrs: Vec<i64> = allowed().iter().map(|(_, nr)| *nr).collect();
        assert!(!nrs.contains(&libc::SYS_execve));
        assert!(!nrs.contains(&libc::SYS_openat));
    }
}
