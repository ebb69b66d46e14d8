//! The one home of `unsafe` and of raw process plumbing: fork, file-descriptor hygiene after
//! fork, flock, stdio redirection, signal masks and `/proc` readings — and the two unchecked
//! steps of the data path: reading a socket into memory that was not zero-filled first, and
//! text that was just validated.
//!
//! Everything that can go wrong in a forking server without threads goes wrong here, so it is
//! kept small and each `unsafe` block says why it holds.

#![allow(unsafe_code)]

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::unistd::Pid;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Which side of a `fork` this process is on.
pub enum Fork {
    Parent(Pid),
    Child,
}

/// Forks the calling process.
///
/// Only ever called from single-threaded code (the master, or the CLI before it becomes the
/// master): a fork taken while another thread holds a lock would deadlock the child.
pub fn fork() -> io::Result<Fork> {
    // SAFETY: the caller is single-threaded (the master never starts threads; see docs/architecture.md), so
    // no lock can be held by a thread that does not exist in the child.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Parent { child } => Ok(Fork::Parent(child)),
        nix::unistd::ForkResult::Child => Ok(Fork::Child),
    }
}

/// Drops `NOTIFY_SOCKET` from this process's environment: a worker must not speak for the
/// service (only the master does, `NotifyAccess=main`).
pub fn forget_notify_socket() {
    // SAFETY: called in a freshly forked worker, which runs only the thread that forked, so no
    // other thread can be reading the environment.
    unsafe { std::env::remove_var("NOTIFY_SOCKET") };
}

/// Drops `name` from the environment: a new master reads the descriptors a binary upgrade left
/// it, then forgets them.
pub fn forget_upgrade_env(name: &str) {
    // SAFETY: called by the master at start, before it forks a worker or starts anything:
    // the process has one thread, so no other thread can be reading the environment.
    unsafe { std::env::remove_var(name) };
}

/// In a freshly forked child: closes every inherited descriptor above stderr except `keep`.
///
/// Sweeping `/proc/self/fd` rather than listing what the master owns means nothing can leak
/// into a worker by accident: not the other slots' listeners, not the control socket, not the
/// pid-file lock (a worker holding it would block the next `wsd start`).
pub fn close_fds_except(keep: &[RawFd]) {
    let fds: Vec<RawFd> = match std::fs::read_dir("/proc/self/fd") {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(_) => (3..1024).collect(),
    };
    for fd in fds {
        if fd > 2 && !keep.contains(&fd) {
            // SAFETY: in the child right after fork nothing else uses these descriptors; the
            // objects that wrap them in the parent's copy of memory are never touched again.
            unsafe { libc::close(fd) };
        }
    }
}

/// Asks the kernel to SIGKILL this process when its parent (the master) dies.
pub fn die_with_parent(master: Pid) -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from)?;
    // The master may have died between fork and prctl; then the signal never comes.
    if nix::unistd::getppid() != master {
        std::process::exit(1);
    }
    Ok(())
}

/// Lets this process outlive its parent (clears `PR_SET_PDEATHSIG`): a worker that keeps a
/// line to hand its connections back if its master dies mid-upgrade must live to do it.
/// [`die_with_parent`] ties it again.
pub fn outlive_parent() -> io::Result<()> {
    nix::sys::prctl::set_pdeathsig(None).map_err(io::Error::from)
}

/// Has the kernel SIGKILL the process `cmd` starts when the thread that starts it (the
/// worker's loop) dies: a worker's handler never outlives it.
pub fn kill_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: runs in the child between fork and exec, where only async-signal-safe calls
    // are allowed; prctl(PR_SET_PDEATHSIG) is a plain system call and allocates nothing.
    unsafe {
        cmd.pre_exec(|| nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(io::Error::from));
    }
}

/// Makes a descriptor (a pipe to a handler) non-blocking.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    // SAFETY: `fd` is open for the duration of the call: the caller holds its owner.
    let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
    let flags = OFlag::from_bits_truncate(fcntl(fd, FcntlArg::F_GETFL).map_err(io::Error::from)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(())
}

/// Takes an exclusive, non-blocking `flock` on `file`. `Ok(false)` means another process holds it.
pub fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Points stdin at /dev/null and stdout/stderr at `log` (daemon mode).
pub fn redirect_stdio(log: &File) -> io::Result<()> {
    let null = File::open("/dev/null")?;
    for (from, to) in [
        (null.as_raw_fd(), 0),
        (log.as_raw_fd(), 1),
        (log.as_raw_fd(), 2),
    ] {
        // SAFETY: dup2 onto the standard descriptors, which this process owns; both are valid.
        if unsafe { libc::dup2(from, to) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The signals wsd handles itself, read from a signalfd in the event loops.
pub fn handled_signals() -> SigSet {
    let mut set = SigSet::empty();
    for s in [
        Signal::SIGCHLD,
        Signal::SIGTERM,
        Signal::SIGINT,
        Signal::SIGQUIT,
        Signal::SIGHUP,
        Signal::SIGUSR1,
        Signal::SIGUSR2,
    ] {
        set.add(s);
    }
    set
}

/// Blocks the handled signals and returns a non-blocking signalfd that receives them.
///
/// A signalfd instead of handler-and-self-pipe because the master forks: a child inherits
/// signal handlers that write into the parent's pipe, while a signalfd is simply closed in the
/// child and recreated.
pub fn signal_fd() -> io::Result<SignalFd> {
    let set = handled_signals();
    set.thread_block().map_err(io::Error::from)?;
    SignalFd::with_flags(&set, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)
        .map_err(io::Error::from)
}

/// Gives the memory the allocator holds free back to the system. A worker that has handed
/// its connections over may live on for a while (an upgrade keeps it until the new master
/// commits), and glibc keeps what its connections freed otherwise.
pub fn trim_heap() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointer; it only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Resident memory of this process in bytes, from `/proc/self/statm`.
pub fn rss_bytes() -> u64 {
    rss_of("self")
}

/// Resident memory of `pid` in bytes (0 if unreadable).
pub fn rss_of(pid: &str) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    // SAFETY: sysconf has no memory-safety preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    pages * page.max(4096) as u64
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> [f64; 3] {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = text.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// Binds a Unix stream socket at `path` that only its owner (and root) can connect to: the
/// file is created with mode 0600, under a file-mode creation mask of 0177 set just around the
/// `bind`, so it is never reachable by others, not even for an instant before a `chmod`.
///
/// The mask is process-wide, so this is for single-threaded code only (the master).
pub fn bind_owner_only(path: &std::path::Path) -> io::Result<std::os::unix::net::UnixListener> {
    use nix::sys::stat::{Mode, umask};
    let previous = umask(Mode::from_bits_truncate(0o177));
    let bound = std::os::unix::net::UnixListener::bind(path);
    umask(previous);
    bound
}

/// Name of a signal number, for exit logs ("killed by SIGKILL").
pub fn signal_name(sig: i32) -> String {
    Signal::try_from(sig)
        .map(|s| s.as_str().to_string())
        .unwrap_or_else(|_| format!("signal {sig}"))
}

/// Sends `data` on a Unix stream socket with `fd` attached (`SCM_RIGHTS`): how the master
/// hands a reopened log file to workers that may no longer have the right to open it.
pub fn send_with_fd(sock: RawFd, data: &[u8], fd: RawFd) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let iov = [io::IoSlice::new(data)];
    let fds = [fd];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        sock,
        &iov,
        &cmsg,
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        None,
    )
    .map_err(io::Error::from)
}

/// Sends `data` (gathered) with the descriptors `fds` (`SCM_RIGHTS`, at most 253), without
/// blocking; like `send_with_fd`, but many at once.
pub fn send_with_fds(sock: RawFd, data: &[io::IoSlice<'_>], fds: &[RawFd]) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, sendmsg};
    let rights = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &rights };
    let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
    sendmsg::<()>(sock, data, cmsgs, flags, None).map_err(io::Error::from)
}

/// Reads from a Unix stream socket like `read`, keeping any descriptors that arrive with the
/// bytes (`SCM_RIGHTS`) in `fds`.
pub fn recv_with_fds(sock: RawFd, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<usize> {
    use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
    let mut iov = [io::IoSliceMut::new(buf)];
    // Room for more descriptors than the master ever sends with one line (one), so a
    // truncated control message cannot happen in practice.
    // Room for the most the kernel passes in one message (SCM_MAX_FD, 253): a handoff line
    // sends that many at once, and a truncated control message would lose descriptors.
    let mut space = nix::cmsg_space!([RawFd; 256]);
    let msg = recvmsg::<()>(
        sock,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_CMSG_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::ScmRights(received) = c {
            for fd in received {
                // SAFETY: the kernel just installed this descriptor in this process for us;
                // nothing else owns it.
                fds.push(unsafe { OwnedFd::from_raw_fd(fd) });
            }
        }
    }
    Ok(msg.bytes)
}

/// Takes ownership of a descriptor this process inherited by number (a binary upgrade names
/// them in its environment: `master::upgrade`).
pub fn inherited_fd(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 || nix::fcntl::fcntl(borrowed(fd), nix::fcntl::FcntlArg::F_GETFD).is_err() {
        return Err(io::Error::other(format!(
            "descriptor {fd} was not inherited"
        )));
    }
    // SAFETY: the descriptor is open (checked just above) and was passed to this process by
    // the master it replaces, for it alone: nothing else in this process owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets whether `fd` survives an `exec` (clears or sets `FD_CLOEXEC`).
pub fn set_inheritable(fd: RawFd, inheritable: bool) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, FdFlag, fcntl};
    let flags = match inheritable {
        true => FdFlag::empty(),
        false => FdFlag::FD_CLOEXEC,
    };
    fcntl(borrowed(fd), FcntlArg::F_SETFD(flags)).map_err(io::Error::from)?;
    Ok(())
}

fn borrowed(fd: RawFd) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: used only for the duration of one fcntl call on a descriptor the caller names as
    // open; fcntl on a closed one fails with EBADF, which the callers report.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

/// Points stdout and stderr at `fd` (a reopened log file).
pub fn redirect_output(fd: RawFd) -> io::Result<()> {
    for to in [1, 2] {
        // SAFETY: dup2 onto the standard descriptors, which this process owns; `fd` is valid.
        if unsafe { libc::dup2(fd, to) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A listening TCP socket's accept queue: (connections waiting, limit), from `TCP_INFO`
/// (for a listener the kernel reports them in `tcpi_unacked` and `tcpi_sacked`).
pub fn listen_queue(listener: &impl AsRawFd) -> io::Result<(u32, u32)> {
    // SAFETY: tcp_info is plain old data; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info.tcpi_unacked, info.tcpi_sacked))
}

/// The pid that `/proc/locks` names as holding a `flock` on the file `meta` describes, if any
/// process holds one.
///
/// Reads the kernel's lock table and touches no lock. The pid is that of the process that
/// took the lock (it may have forked and exited since, as `start -d` does), 0 if that process
/// is outside our pid namespace.
#[cfg(feature = "cli")]
pub fn flock_holder(meta: &std::fs::Metadata) -> io::Result<Option<i32>> {
    use std::os::unix::fs::MetadataExt;
    let table = std::fs::read_to_string("/proc/locks")?;
    let dev = meta.dev();
    let (major, minor) = (nix::sys::stat::major(dev), nix::sys::stat::minor(dev));
    Ok(flock_holder_in(&table, (major, minor, meta.ino())))
}

/// Finds a held FLOCK on `(major, minor, inode)` in `/proc/locks` text, whose lines read
/// `1: FLOCK  ADVISORY  WRITE 4310 fe:00:10010628 0 EOF` (device numbers in hex, the inode in
/// decimal). A waiter's line has `->` after the id and holds nothing; POSIX and OFD locks are
/// other kinds of lock.
#[cfg(feature = "cli")]
fn flock_holder_in(table: &str, file: (u64, u64, u64)) -> Option<i32> {
    table.lines().find_map(|line| {
        let mut fields = line.split_whitespace().skip(1);
        if fields.next()? != "FLOCK" {
            return None;
        }
        let pid = fields.nth(2)?.parse().ok()?;
        let mut id = fields.next()?.split(':');
        let major = u64::from_str_radix(id.next()?, 16).ok()?;
        let minor = u64::from_str_radix(id.next()?, 16).ok()?;
        let inode = id.next()?.parse().ok()?;
        ((major, minor, inode) == file).then_some(pid)
    })
}

/// Clock ticks per second, the unit of the CPU times in `/proc/<pid>/stat` (`wsd bench`).
#[cfg(feature = "bench")]
pub fn clock_ticks_per_sec() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// A non-blocking CLOCK_MONOTONIC timerfd: a wake-up finer than a poll timeout, which the
/// kernel takes in whole milliseconds (the worker's alarm, `wsd bench`'s open-loop schedules).
pub fn timer_fd() -> io::Result<OwnedFd> {
    let flags = libc::TFD_NONBLOCK | libc::TFD_CLOEXEC;
    // SAFETY: timerfd_create takes no pointers.
    let fd = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the descriptor was just created for us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Arms `timer` (from [`timer_fd`]) to fire once, `ns` nanoseconds from now (at least 1).
pub fn arm_timer(timer: &OwnedFd, ns: u64) -> io::Result<()> {
    let ns = ns.max(1);
    let zero = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let spec = libc::itimerspec {
        it_interval: zero,
        it_value: libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        },
    };
    // SAFETY: `spec` is a valid itimerspec that outlives the call; a null old value is allowed.
    let rc = unsafe { libc::timerfd_settime(timer.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads from socket `fd` into the free room of `buf`, which grows by what was read. The room
/// is not zero-filled first, as reading into a `&mut [u8]` would need.
pub(crate) fn recv_into(fd: RawFd, buf: &mut bytes::BytesMut) -> io::Result<usize> {
    let room = buf.spare_capacity_mut();
    // SAFETY: `room` is memory that `buf` owns and lends to nothing else; recv writes at most
    // `room.len()` bytes into it.
    let n = unsafe { libc::recv(fd, room.as_mut_ptr().cast(), room.len(), 0) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: recv initialised the first `n` bytes of the free room, which follow `buf`'s
    // contents.
    unsafe { buf.set_len(buf.len() + n) };
    Ok(n)
}

/// Bytes known to be UTF-8: checked once when made (with SIMD, `simdutf8`), then read as
/// `str` without a second check. The scalar `std` check on every read was 4 % of a worker's
/// time echoing 4 KiB text messages. Every constructor checks or takes a `str`, which is what
/// makes [`Utf8::as_str`] sound.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Utf8(bytes::Bytes);

impl Utf8 {
    pub(crate) fn new(bytes: bytes::Bytes) -> Option<Utf8> {
        simdutf8::basic::from_utf8(&bytes).ok()?;
        Some(Utf8(bytes))
    }

    pub(crate) fn from_string(s: String) -> Utf8 {
        Utf8(bytes::Bytes::from(s))
    }

    pub(crate) const fn from_static(s: &'static str) -> Utf8 {
        Utf8(bytes::Bytes::from_static(s.as_bytes()))
    }

    pub(crate) fn as_str(&self) -> &str {
        // SAFETY: every constructor either validated these bytes as UTF-8 or took them from a
        // `str`, and `Bytes` is immutable, so they are still UTF-8.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }

    pub(crate) fn into_bytes(self) -> bytes::Bytes {
        self.0
    }
}

#[cfg(all(test, feature = "cli"))]
mod tests {
    use super::*;

    #[test]
    fn proc_locks_lines_are_read_by_kind_device_and_inode() {
        let table = "\
1: POSIX  ADVISORY  WRITE 700 fe:00:42 0 EOF
2: FLOCK  ADVISORY  WRITE 4310 fe:00:10010628 0 EOF
2: -> FLOCK  ADVISORY  WRITE 4399 fe:00:77 0 EOF
3: FLOCK  ADVISORY  WRITE 4311 103:02:77 0 EOF
4: OFDLCK ADVISORY  READ  -1 fe:00:55 0 EOF
";
        assert_eq!(flock_holder_in(table, (0xfe, 0, 10010628)), Some(4310));
        assert_eq!(flock_holder_in(table, (0x103, 2, 77)), Some(4311));
        assert_eq!(flock_holder_in(table, (0xfe, 0, 77)), None, "only a waiter");
        assert_eq!(flock_holder_in(table, (0xfe, 0, 42)), None, "a POSIX lock");
        assert_eq!(
            flock_holder_in(table, (0xfe, 1, 10010628)),
            None,
            "other device"
        );
        assert_eq!(flock_holder_in("", (0xfe, 0, 10010628)), None);
    }

    #[test]
    fn a_flock_taken_here_shows_in_proc_locks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let held = File::create(&path).unwrap();
        let meta = held.metadata().unwrap();
        assert_eq!(flock_holder(&meta).unwrap(), None);
        assert!(try_lock_exclusive(&held).unwrap());
        assert_eq!(
            flock_holder(&meta).unwrap(),
            Some(std::process::id() as i32)
        );
        drop(held);
        assert_eq!(flock_holder(&meta).unwrap(), None);
    }
}
