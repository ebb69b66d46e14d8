//! The worker's handler process (`app = "exec"`, protocol in `exec::protocol`).
//!
//! One process per worker, for all its connections. Its stdin, stdout and stderr are
//! non-blocking pipes in the worker's poll, so the loop never waits on it:
//!
//! - **Events** are lines appended to `out` as the turn's hooks run, and written at the end of
//!   the turn: many lines in one `write`. What the pipe does not take waits in `out`. Past
//!   `handler_queue` bytes the worker stops reading its clients (`held`), and reads them again
//!   once the handler has taken half of it: a slow handler is held by TCP flow control, not by
//!   the worker's memory.
//! - **Commands** are read from stdout a budget at a time and carried out at once. A line that
//!   is not a command is logged (escaped, cut short) and skipped; one longer than
//!   `exec::lines`' bound is skipped without being held.
//! - **stderr** goes to the worker's log, a line at a time.
//! - **Death.** A handler whose stdout closes (or whose stdin breaks) is reaped and started
//!   again after a backoff. Its clients stay connected. The events it had not read are lost
//!   with it; those that come while it is down are held, in the same bounded `out`. The new
//!   handler reads `worker_start`, then a `connect` with `"replay": true` for every open
//!   connection, then the held events.

use super::decisions::Decided;
use super::event_loop::Loop;
use super::timers::TimerId;
use super::webhook::Kind;
use crate::backoff::Backoff;
use crate::config::GroupConfig;
use crate::exec::lines::{Lines, Piece};
use crate::exec::protocol::{self, Command, Connecting, Event};
use crate::{ConnId, Message};
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Child, ChildStderr, ChildStdin, ChildStdout, Stdio};
use std::time::{Duration, Instant};

/// The handler's stdout, stderr and stdin.
pub(super) const HANDLER_OUT: Token = Token(5);
pub(super) const HANDLER_ERR: Token = Token(6);
pub(super) const HANDLER_IN: Token = Token(7);

/// Reads of stdout per turn at most, so a chatty handler cannot starve the clients.
const READS_PER_TURN: usize = 16;
const READ_CHUNK: usize = 64 << 10;
/// Longest stderr line logged whole.
const ERR_LINE: usize = 4 << 10;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// How long an exiting worker gives its handler to finish after its stdin closes.
const HANDLER_GRACE: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// Where the handler is.
enum Life {
    Running(Running),
    /// Not running; started again at `restart_at`.
    Down {
        restart_at: Instant,
    },
}

struct Running {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    stderr: Option<ChildStderr>,
}

/// The handler and what waits for it.
pub(super) struct Handler {
    command: Vec<String>,
    cwd: Option<PathBuf>,
    env: BTreeMap<String, String>,
    life: Life,
    backoff: Backoff,
    /// Starts so far; sent in `worker_start`.
    generation: u64,
    /// Lines the handler has not taken yet.
    out: Vec<u8>,
    limit: usize,
    stdout: Lines,
    stderr: Lines,
    /// Clients not read while `out` is over the limit.
    held: Vec<usize>,
    /// The handler's timers, by its names for them.
    pub(super) timers: HashMap<String, (TimerId, bool)>,
    /// stdout had more than a turn's reads.
    pub(super) again: bool,
    /// Where stdout is read into: one per worker, kept.
    chunk: Box<[u8]>,
    /// Decides upgrades (`authorize`).
    authorize: bool,
}

impl Handler {
    pub(super) fn new(settings: &GroupConfig) -> Handler {
        Handler {
            command: settings.command.clone(),
            cwd: settings.cwd.clone(),
            env: settings.env.clone(),
            life: Life::Down {
                restart_at: Instant::now(),
            },
            backoff: Backoff::new(MIN_BACKOFF, MAX_BACKOFF),
            generation: 0,
            out: Vec::new(),
            limit: settings.handler_queue,
            stdout: Lines::new(2 * settings.max_message_size + (64 << 10)),
            stderr: Lines::new(ERR_LINE),
            held: Vec::new(),
            timers: HashMap::new(),
            again: false,
            chunk: vec![0u8; READ_CHUNK].into_boxed_slice(),
            authorize: settings.authorize,
        }
    }

    /// The handler decides upgrades.
    pub(super) fn decides(&self) -> bool {
        self.authorize
    }

    pub(super) fn is_running(&self) -> bool {
        matches!(self.life, Life::Running(_))
    }

    /// Queues a line for the handler.
    pub(super) fn queue(&mut self, line: &[u8]) {
        self.out.extend_from_slice(line);
    }

    /// Queues `event` as a line, written in place.
    pub(super) fn queue_event(&mut self, event: &Event<'_>) {
        protocol::write_line(&mut self.out, event);
    }

    /// Too much waits for the handler: its clients are not read.
    pub(super) fn congested(&self) -> bool {
        self.out.len() >= self.limit
    }

    /// Client `idx` is not read until the handler catches up.
    pub(super) fn hold(&mut self, idx: usize) {
        if !self.held.contains(&idx) {
            self.held.push(idx);
        }
    }

    /// The clients to read again, once the handler has taken half of the limit.
    pub(super) fn release(&mut self) -> Vec<usize> {
        if self.out.len() > self.limit / 2 {
            return Vec::new();
        }
        std::mem::take(&mut self.held)
    }

    /// When a stopped handler is due to start.
    pub(super) fn restart_at(&self) -> Option<Instant> {
        match self.life {
            Life::Down { restart_at } => Some(restart_at),
            Life::Running(_) => None,
        }
    }

    /// Starts the process and registers its pipes; on failure it is tried again later.
    /// `prologue` (`worker_start` and the replay) goes before what waited.
    fn start(&mut self, registry: &Registry, prologue: impl FnOnce(u64) -> Vec<u8>) {
        let mut cmd = std::process::Command::new(&self.command[0]);
        cmd.args(&self.command[1..])
            .envs(&self.env)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(dir) = &self.cwd {
            cmd.current_dir(dir);
        }
        crate::sys::kill_with_parent(&mut cmd);
        let running = cmd.spawn().and_then(|mut child| {
            let stdin = child.stdin.take().expect("piped");
            let stdout = child.stdout.take().expect("piped");
            let stderr = child.stderr.take().expect("piped");
            for fd in [stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()] {
                crate::sys::set_nonblocking(fd)?;
            }
            let fd = stdout.as_raw_fd();
            registry.register(&mut SourceFd(&fd), HANDLER_OUT, Interest::READABLE)?;
            let fd = stderr.as_raw_fd();
            registry.register(&mut SourceFd(&fd), HANDLER_ERR, Interest::READABLE)?;
            let fd = stdin.as_raw_fd();
            registry.register(&mut SourceFd(&fd), HANDLER_IN, Interest::WRITABLE)?;
            Ok(Running {
                child,
                stdin,
                stdout,
                stderr: Some(stderr),
            })
        });
        match running {
            Ok(r) => {
                self.generation += 1;
                log::info!(
                    "handler {:?} started, pid {}",
                    self.command.join(" "),
                    r.child.id()
                );
                let mut lines = prologue(self.generation);
                lines.append(&mut self.out);
                self.out = lines;
                self.life = Life::Running(r);
            }
            Err(e) => {
                let delay = self.backoff.next_delay();
                log::error!(
                    "cannot start handler {:?}: {e}; trying again in {delay:?}",
                    self.command.join(" ")
                );
                self.life = Life::Down {
                    restart_at: Instant::now() + delay,
                };
            }
        }
    }

    /// The handler is gone (or going): reaped, and started again after a backoff.
    fn died(&mut self, registry: &Registry, why: &str) {
        let Life::Running(mut r) = std::mem::replace(
            &mut self.life,
            Life::Down {
                restart_at: Instant::now(),
            },
        ) else {
            return;
        };
        for fd in [r.stdin.as_raw_fd(), r.stdout.as_raw_fd()] {
            let _ = registry.deregister(&mut SourceFd(&fd));
        }
        if let Some(e) = &r.stderr {
            let _ = registry.deregister(&mut SourceFd(&e.as_raw_fd()));
        }
        let _ = r.child.kill();
        let how = match r.child.wait() {
            Ok(status) => status.to_string(),
            Err(e) => format!("not reaped: {e}"),
        };
        let delay = self.backoff.next_delay();
        log::warn!("handler {why} ({how}); starting it again in {delay:?}, clients stay");
        // What the dead handler had not read is lost with it, a partial line included.
        self.out.clear();
        self.stdout.reset();
        self.stderr.reset();
        self.life = Life::Down {
            restart_at: Instant::now() + delay,
        };
    }

    /// The worker is exiting: what waits is written (for up to `grace`), stdin is closed, the
    /// handler's cue to finish, and it has what is left of `grace` to exit before `SIGKILL`.
    fn shut_down(&mut self, grace: Duration) {
        let deadline = Instant::now() + grace;
        while !self.out.is_empty() && Instant::now() < deadline && self.write_out() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let Life::Running(r) = std::mem::replace(
            &mut self.life,
            Life::Down {
                restart_at: deadline,
            },
        ) else {
            return;
        };
        let Running {
            mut child, stdin, ..
        } = r;
        drop(stdin);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        log::warn!("handler did not exit within {grace:?} of its stdin closing; killed");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Writes what waits, as much as the pipe takes. False if the handler is gone.
    fn write_out(&mut self) -> bool {
        let Life::Running(r) = &mut self.life else {
            return true;
        };
        let mut written = 0;
        while written < self.out.len() {
            match r.stdin.write(&self.out[written..]) {
                Ok(0) => return false,
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
        self.out.drain(..written);
        if self.out.capacity() > 4 * self.limit && self.out.len() < self.limit {
            self.out.shrink_to(self.limit);
        }
        true
    }

    /// Reads stdout, a turn's worth: the lines that came. `None` when stdout has closed.
    fn read_lines(&mut self) -> Option<Vec<Vec<u8>>> {
        let Life::Running(r) = &mut self.life else {
            return Some(Vec::new());
        };
        let mut lines = Vec::new();
        self.again = false;
        for _ in 0..READS_PER_TURN {
            match r.stdout.read(&mut self.chunk) {
                Ok(0) => return None,
                Ok(n) => self.stdout.feed(&self.chunk[..n], |p| match p {
                    Piece::Line(l) if l.iter().all(u8::is_ascii_whitespace) => {}
                    Piece::Line(l) => lines.push(l.to_vec()),
                    Piece::TooLong(n) => {
                        log::warn!("handler wrote a {n}-byte line, over the limit; skipped")
                    }
                }),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Some(lines),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        }
        self.again = true;
        Some(lines)
    }

    /// Logs what the handler wrote on stderr.
    fn read_stderr(&mut self, registry: &Registry) {
        let Life::Running(r) = &mut self.life else {
            return;
        };
        let Some(stderr) = r.stderr.as_mut() else {
            return;
        };
        let mut buf = [0u8; 8 << 10];
        loop {
            match stderr.read(&mut buf) {
                Ok(n) if n > 0 => self.stderr.feed(&buf[..n], |p| match p {
                    Piece::Line(l) => log::warn!("handler: {}", crate::escaped(l)),
                    Piece::TooLong(n) => log::warn!("handler: ({n} bytes of stderr)"),
                }),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Closed (or broken): the handler's exit shows on stdout.
                _ => {
                    let _ = registry.deregister(&mut SourceFd(&stderr.as_raw_fd()));
                    r.stderr = None;
                    return;
                }
            }
        }
    }
}

impl Loop {
    /// Starts the handler if it is due (first start, or after a death and its backoff).
    pub(super) fn handler_due(&mut self, now: Instant) {
        self.decisions_overdue(now);
        let Some(h) = self.handler.as_mut() else {
            return;
        };
        if h.restart_at().is_some_and(|at| at <= now) {
            let prologue = self.handler_prologue();
            let h = self.handler.as_mut().expect("checked");
            h.start(self.poll.registry(), prologue);
        }
    }

    /// `worker_start`, then a replayed `connect` per open connection.
    fn handler_prologue(&self) -> impl FnOnce(u64) -> Vec<u8> + use<> {
        let group = self.ctx.worker_name().to_string();
        let worker = self.ctx.worker_id;
        let mut open: Vec<Vec<u8>> = (self.ctx.connections().into_iter())
            .filter_map(|id| self.connect_line(id, None, true))
            .collect();
        open.push(self.decisions.lines());
        move |generation| {
            let mut out = protocol::line(&Event::WorkerStart {
                protocol: protocol::VERSION,
                group: &group,
                worker,
                generation,
            });
            for line in open {
                out.extend_from_slice(&line);
            }
            out
        }
    }

    /// `id` as the handler knows it, whether it is open, handshaking or just gone.
    pub(super) fn named(&self, id: ConnId) -> crate::GlobalId {
        crate::GlobalId {
            host: self.ctx.bus.origin.host,
            slot: self.ctx.bus.origin.slot,
            conn: id,
        }
    }

    /// The `connect` event of `id`, with the upgrade's headers when it has just come.
    pub(super) fn connect_line(
        &self,
        id: ConnId,
        headers: Option<&[(String, String)]>,
        replay: bool,
    ) -> Option<Vec<u8>> {
        let connecting = Connecting {
            conn: self.ctx.global_id(id)?.to_string(),
            target: self.ctx.path(id)?,
            headers: headers.unwrap_or_default(),
            remote: self.ctx.remote_addr(id)?.to_string(),
            user: self.ctx.user_of(id),
        };
        Some(protocol::line(&connecting.event(false, replay)))
    }

    /// The `adopt` event of `id`, handed over as `from` with `topics`.
    fn adopt_line(&self, id: ConnId, from: &str, topics: &[String]) -> Option<Vec<u8>> {
        let target = self.ctx.path(id)?;
        let (path, query) = match target.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (target, None),
        };
        Some(protocol::line(&Event::Adopt {
            conn: self.ctx.global_id(id)?.to_string(),
            from,
            path,
            query,
            remote: self.ctx.remote_addr(id)?.to_string(),
            user: self.ctx.user_of(id),
            topics,
        }))
    }

    /// Tells the handler of a connection's message or close; held while it is down, except a
    /// connect, which the replay will bring.
    pub(super) fn handler_tell(&mut self, id: ConnId, what: Told<'_>) {
        // A backend that decided on the upgrade has had its connect already.
        if matches!(what, Told::Connect(_)) && self.backend_decides() {
            return;
        }
        let (kind, line) = match what {
            Told::Connect(headers) => (Kind::Connect, self.connect_line(id, Some(headers), false)),
            Told::Message(msg) => {
                let Some(conn) = self.ctx.global_id(id) else {
                    return;
                };
                let event = Event::Message {
                    conn,
                    data: crate::json_data::Data(msg),
                };
                if let Some(h) = self.handler.as_mut() {
                    // The busiest event goes straight into the handler's queue.
                    h.queue_event(&event);
                    return;
                }
                (Kind::Message, Some(protocol::line(&event)))
            }
            // The connection is out of the slab already.
            Told::Close => {
                let conn = self.named(id).to_string();
                (Kind::Close, Some(protocol::line(&Event::Close { conn })))
            }
            Told::Adopt { from, topics } => (Kind::Message, self.adopt_line(id, from, topics)),
            Told::Handoff => {
                let conn = self.named(id).to_string();
                (Kind::Close, Some(protocol::line(&Event::Handoff { conn })))
            }
        };
        if let Some(line) = line
            && !self.tell_backend(kind, id, &line)
        {
            log::debug!("the webhook's queue is full: a {kind:?} event of {id} is dropped");
        }
    }

    /// Whether upgrades wait for the backend's decision: an exec handler with `authorize`,
    /// or a webhook.
    pub(super) fn backend_decides(&self) -> bool {
        self.handler.as_ref().is_some_and(|h| h.decides()) || self.webhook.is_some()
    }

    /// Hands an event to the backend: queued for the exec handler (a `connect` only while it
    /// runs: its restart's replay brings the rest), or POSTed. False if it cannot take it.
    pub(super) fn tell_backend(&mut self, kind: Kind, id: ConnId, line: &[u8]) -> bool {
        if let Some(h) = self.handler.as_mut() {
            if kind != Kind::Connect || h.is_running() {
                h.queue(line);
            }
            return true;
        }
        match self.webhook.as_mut() {
            Some(w) => w.post(kind, id, line.to_vec()),
            None => true,
        }
    }

    /// The backend cannot keep up: client `idx` is not read until it does.
    pub(super) fn backend_holds(&mut self, idx: usize) -> bool {
        if let Some(h) = self.handler.as_mut().filter(|h| h.congested()) {
            h.hold(idx);
            return true;
        }
        if let Some(w) = self.webhook.as_mut().filter(|w| w.congested()) {
            w.hold(idx);
            return true;
        }
        false
    }

    /// Timers of the handler that came due in this turn's timers.
    pub(super) fn handler_timers_fired(&mut self) {
        for name in std::mem::take(&mut self.ctx.handler_timers) {
            let Some(h) = self.handler.as_mut() else {
                return;
            };
            match h.timers.get(&name) {
                Some((_, false)) => {
                    h.timers.remove(&name);
                }
                Some(_) => {}
                None => continue,
            }
            h.queue(&protocol::line(&Event::Timer { timer: &name }));
        }
    }

    /// End of turn: what waits goes to the handler in one write, and held clients are read
    /// again once it has caught up.
    pub(super) fn handler_flush(&mut self) {
        let Some(h) = self.handler.as_mut() else {
            return;
        };
        if !h.write_out() {
            return self.handler_died("stopped reading its stdin");
        }
        let released = h.release();
        self.again.extend(released);
    }

    /// stdout is readable: carry out each command.
    pub(super) fn handler_readable(&mut self) {
        let Some(h) = self.handler.as_mut() else {
            return;
        };
        let Some(lines) = h.read_lines() else {
            return self.handler_died("closed its stdout");
        };
        for line in lines {
            self.handler_line(&line);
        }
    }

    pub(super) fn handler_stderr(&mut self) {
        if let Some(h) = self.handler.as_mut() {
            h.read_stderr(self.poll.registry());
        }
    }

    /// One line from the handler.
    fn handler_line(&mut self, line: &[u8]) {
        let read = protocol::read_command(line);
        let outcome = match read.command {
            Ok(cmd) => self.handler_command(cmd),
            Err(e) => {
                let shown: Vec<u8> = line.iter().take(200).copied().collect();
                log::warn!("handler line skipped: {e}: {}", crate::escaped(&shown));
                Err(e.to_string())
            }
        };
        if let (Some(id), Some(h)) = (read.id, self.handler.as_mut()) {
            h.queue(&protocol::answer(&id, outcome));
        }
    }

    /// Carries out a command (an exec handler's, or from a webhook's answer); `Err` says why
    /// it could not be.
    pub(super) fn handler_command(&mut self, cmd: Command) -> Result<(), String> {
        let here = self.ctx.bus.origin;
        let local = |g: crate::GlobalId| {
            (g.host == here.host && g.slot == here.slot)
                .then(|| g.conn())
                .ok_or_else(|| format!("connection {g} is not this worker's"))
        };
        let gone = |id: ConnId| format!("connection {id} is gone");
        match cmd {
            Command::Send { conn, data } => self
                .ctx
                .send_to(conn, data)
                .map_err(|e| format!("send to {conn}: {e}")),
            Command::Broadcast { data } => {
                self.ctx.broadcast(data);
                Ok(())
            }
            Command::Publish { topic, data } => {
                self.ctx.publish(&topic, data);
                Ok(())
            }
            Command::Subscribe { conn, topic } => {
                let id = local(conn)?;
                if !self.ctx.is_open(id) {
                    return Err(gone(id));
                }
                self.ctx.subscribe(id, &topic);
                Ok(())
            }
            Command::Unsubscribe { conn, topic } => {
                let id = local(conn)?;
                self.ctx.unsubscribe(id, &topic);
                Ok(())
            }
            Command::SendUser { user, data } => {
                self.ctx.send_to_user(&user, data);
                Ok(())
            }
            Command::BindUser { conn, user } => {
                let id = local(conn)?;
                self.ctx
                    .bind_user(id, &user)
                    .then_some(())
                    .ok_or_else(|| gone(id))
            }
            Command::Close { conn, code, reason } => {
                let id = local(conn)?;
                if !self.ctx.is_open(id) {
                    return Err(gone(id));
                }
                self.ctx.close_with(id, code, &reason);
                Ok(())
            }
            Command::AddTimer {
                timer,
                after,
                repeat,
            } => {
                if self.handler.is_none() {
                    return Err("timers are for app = \"exec\"".into());
                }
                self.handler_del_timer(&timer);
                let name = timer.clone();
                let fire = move |ctx: &mut crate::Context| ctx.handler_timers.push(name.clone());
                let id = if repeat {
                    self.ctx.add_timer(after, fire)
                } else {
                    self.ctx.add_timer_once(after, fire)
                };
                if let Some(h) = self.handler.as_mut() {
                    h.timers.insert(timer, (id, repeat));
                }
                Ok(())
            }
            Command::DelTimer { timer } => {
                if self.handler_del_timer(&timer) {
                    Ok(())
                } else {
                    Err(format!("no timer {timer:?}"))
                }
            }
            Command::Accept {
                conn,
                user,
                subscribe,
            } => self.handler_decided(local(conn)?, Decided::Accept { user, subscribe }),
            Command::Reject {
                conn,
                status,
                reason,
            } => self.handler_decided(local(conn)?, Decided::Reject { status, reason }),
        }
    }

    fn handler_del_timer(&mut self, name: &str) -> bool {
        let id = self.handler.as_mut().and_then(|h| h.timers.remove(name));
        id.is_some_and(|(id, _)| self.ctx.del_timer(id))
    }

    /// The worker is exiting: the handler gets the events still waiting, then EOF, and up to
    /// [`HANDLER_GRACE`] to exit by itself.
    pub(super) fn handler_stop(&mut self) {
        if let Some(h) = self.handler.as_mut() {
            h.shut_down(HANDLER_GRACE);
        }
    }

    /// From the sweep: a handler that exited without closing its stdout (a child of its
    /// own holds it) is noticed here.
    pub(super) fn handler_check(&mut self) {
        let Some(h) = self.handler.as_mut() else {
            return;
        };
        if let Life::Running(r) = &mut h.life
            && let Ok(Some(_)) = r.child.try_wait()
        {
            self.handler_died("exited");
        }
    }

    /// The handler is gone: reaped, its timers cancelled (a new one adds its own), and
    /// started again after a backoff.
    fn handler_died(&mut self, why: &str) {
        let Some(h) = self.handler.as_mut() else {
            return;
        };
        h.died(self.poll.registry(), why);
        for (_, (id, _)) in std::mem::take(&mut h.timers) {
            self.ctx.del_timer(id);
        }
    }
}

/// What a connection did, for [`Loop::handler_tell`].
pub(super) enum Told<'a> {
    /// Upgraded, with the request's headers.
    Connect(&'a [(String, String)]),
    Message(&'a Message),
    Close,
    /// Handed over by the worker this one replaces: its id there, and its topics.
    Adopt {
        from: &'a str,
        topics: &'a [String],
    },
    /// Handed to the worker replacing this one (out of the slab already).
    Handoff,
}
