//! The worker's end of its channel to the master: JSON lines both ways (`control.rs`), plus
//! the descriptors that ride along with some lines (`SCM_RIGHTS`: a reopened log file).
//!
//! Writing never blocks the loop: lines wait in `out` and go out as the socket takes them; the
//! loop calls [`Channel::flush`] again when the socket becomes writable. What may wait there
//! depends on who needs it: a periodic report is dropped past [`REPORT_BACKLOG`] (a stuck
//! master must not grow the worker, and the next report supersedes it), while an answer the
//! master is waiting for (a connection list) is kept up to [`ANSWER_BACKLOG`].

use crate::control::{self, ConnInfo, FromWorker, LineReader, ToWorker};
use crate::sys;
use mio::net::UnixStream;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

/// Backlog past which periodic reports are dropped.
const REPORT_BACKLOG: usize = 64 << 10;
/// Backlog past which even answers are dropped: only a master that stopped reading for good
/// gets there (100,000 connection rows are about 25 MiB).
const ANSWER_BACKLOG: usize = 256 << 20;
/// Connection rows per `connections` line at most.
const CONNS_PER_LINE: usize = 500;
/// Bytes per `connections` line at most: half of the 1 MiB past which the master's
/// `LineReader` gives up on the channel. Rows carry client-chosen paths (up to
/// `max_header_bytes`), so 500 of them alone would not keep a line under it.
const CONNS_LINE_BYTES: usize = 512 << 10;
/// A row's JSON without its client-chosen strings: field names, five u64, an i32, an f64,
/// the stage, and `null` for a missing protocol.
const ROW_FIXED_BYTES: usize = 512;

pub(crate) struct Channel {
    stream: UnixStream,
    lines: LineReader,
    /// Encoded lines not yet taken by the socket.
    out: Vec<u8>,
    /// Descriptors received and not yet claimed by their line, oldest first.
    fds: Vec<OwnedFd>,
    /// The last byte received was not a newline: a line is partly read, and the newest
    /// descriptor may be the one that came with it.
    mid_line: bool,
}

/// `Read` over `recvmsg`, so `LineReader` reads the channel unchanged while the descriptors
/// that arrive with the bytes are kept.
struct RecvWithFds<'a> {
    socket: RawFd,
    fds: &'a mut Vec<OwnedFd>,
    mid_line: &'a mut bool,
}

impl Read for RecvWithFds<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = sys::recv_with_fds(self.socket, buf, self.fds)?;
        if n > 0 {
            *self.mid_line = buf[n - 1] != b'\n';
        }
        Ok(n)
    }
}

impl Channel {
    /// Wraps a stream already registered with the loop's poll.
    pub(crate) fn new(stream: UnixStream) -> Channel {
        Channel {
            stream,
            lines: LineReader::default(),
            out: Vec::new(),
            fds: Vec::new(),
            mid_line: false,
        }
    }

    /// Reads the master's commands, each that carries one (`reopen_logs`, `bridge`) with the
    /// descriptor that came with it.
    /// The flag is false once the master has gone.
    pub(crate) fn read(&mut self) -> (Vec<(ToWorker, Option<OwnedFd>)>, bool) {
        let mut socket = RecvWithFds {
            socket: self.stream.as_raw_fd(),
            fds: &mut self.fds,
            mid_line: &mut self.mid_line,
        };
        let (lines, closed) = self.lines.read_from(&mut socket);
        let mut commands = Vec::new();
        for line in lines {
            match serde_json::from_str::<ToWorker>(&line) {
                Ok(cmd) if cmd.carries_fd() => {
                    let fd = (!self.fds.is_empty()).then(|| self.fds.remove(0));
                    commands.push((cmd, fd));
                }
                Ok(cmd) => commands.push((cmd, None)),
                Err(e) => log::warn!("bad command from master: {e}"),
            }
        }
        self.drop_unclaimed_fds();
        (commands, !closed)
    }

    /// Closes descriptors no line claimed, so a confused master cannot make the worker leak
    /// them. Only the newest may be waiting for the rest of its line.
    fn drop_unclaimed_fds(&mut self) {
        let waiting = usize::from(self.mid_line).min(self.fds.len());
        let unclaimed = self.fds.len() - waiting;
        if unclaimed > 0 {
            log::warn!(
                "closing {unclaimed} descriptor(s) the master sent with no line to claim them"
            );
            self.fds.drain(..unclaimed);
        }
    }

    /// Queues a periodic message; dropped if the master is far behind.
    pub(crate) fn report(&mut self, msg: &FromWorker) {
        if self.out.len() < REPORT_BACKLOG {
            self.out.extend_from_slice(&control::line(msg));
        }
        self.flush();
    }

    /// Queues a message the master is waiting for.
    pub(crate) fn answer(&mut self, msg: &FromWorker) {
        if self.out.len() < ANSWER_BACKLOG {
            self.out.extend_from_slice(&control::line(msg));
        } else {
            log::warn!("master channel backlog over 256 MiB; an answer is dropped");
        }
        self.flush();
    }

    /// Answers a `list_connections` query: the rows in lines of at most [`CONNS_PER_LINE`]
    /// rows and [`CONNS_LINE_BYTES`] bytes.
    pub(crate) fn answer_connections(&mut self, query: u64, rows: impl Iterator<Item = ConnInfo>) {
        let limit = Limit {
            items: CONNS_PER_LINE,
            weight: CONNS_LINE_BYTES,
        };
        for_each_chunk(rows, limit, row_bytes_bound, |conns, last| {
            self.answer(&FromWorker::Connections { query, conns, last })
        });
    }

    /// Writes what the socket takes now; the rest waits for the next writable event.
    pub(crate) fn flush(&mut self) {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            }
        }
    }
}

/// The most a row's JSON can take: a JSON string escapes a byte to 6 at most (`\u00XX`).
fn row_bytes_bound(row: &ConnInfo) -> usize {
    let strings = [
        &row.worker,
        &row.id,
        &row.conn,
        &row.remote,
        &row.path,
        &row.extensions,
    ];
    let protocol = row.protocol.as_ref().map_or(0, String::len);
    ROW_FIXED_BYTES + 6 * (protocol + strings.iter().map(|s| s.len()).sum::<usize>())
}

/// How much one chunk may hold.
#[derive(Clone, Copy)]
struct Limit {
    items: usize,
    /// Summed `weight` of the items; a single heavier item still gets a chunk of its own.
    weight: usize,
}

/// Calls `f` with successive chunks of `items` within `limit`, and whether the chunk is the
/// last. There is always a last chunk, empty when there are no items, so the master hears
/// the end.
fn for_each_chunk<T>(
    items: impl Iterator<Item = T>,
    limit: Limit,
    weight: impl Fn(&T) -> usize,
    mut f: impl FnMut(Vec<T>, bool),
) {
    let mut items = items.peekable();
    loop {
        let mut chunk = Vec::new();
        let mut load = 0;
        while chunk.len() < limit.items
            && let Some(item) =
                items.next_if(|item| chunk.is_empty() || load + weight(item) <= limit.weight)
        {
            load += weight(&item);
            chunk.push(item);
        }
        let last = items.peek().is_none();
        f(chunk, last);
        if last {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::ConnStage;

    /// The sizes of the chunks `n` items of weight 1 to `n` come in, and their last flags.
    fn chunk_sizes(n: usize, items: usize, weight: usize) -> Vec<(usize, bool)> {
        let mut out = Vec::new();
        let limit = Limit { items, weight };
        for_each_chunk(1..=n, limit, |&w| w, |c, last| out.push((c.len(), last)));
        out
    }

    #[test]
    fn rows_go_in_chunks_and_the_last_is_marked_even_when_empty() {
        let any = usize::MAX;
        assert_eq!(chunk_sizes(0, 500, any), [(0, true)]);
        assert_eq!(chunk_sizes(1, 500, any), [(1, true)]);
        assert_eq!(chunk_sizes(500, 500, any), [(500, true)]);
        assert_eq!(chunk_sizes(501, 500, any), [(500, false), (1, true)]);
        assert_eq!(
            chunk_sizes(1200, 500, any),
            [(500, false), (500, false), (200, true)]
        );
        // Weights 1 to 6 within 10: 1+2+3+4, then 5 (5+6 > 10), then 6; below, a 20 gets a
        // chunk of its own though heavier than the limit.
        assert_eq!(chunk_sizes(6, 500, 10), [(4, false), (1, false), (1, true)]);
        let mut seen = Vec::new();
        let limit = Limit {
            items: 3,
            weight: 5,
        };
        for_each_chunk(
            [1, 20, 1, 1, 1, 1, 1].into_iter(),
            limit,
            |&w| w,
            |c, _| seen.push(c),
        );
        assert_eq!(seen, [vec![1], vec![20], vec![1, 1, 1], vec![1, 1]]);
    }

    #[test]
    fn a_row_never_takes_more_json_than_its_bound() {
        let row = ConnInfo {
            pid: i32::MIN,
            worker: "w\u{1}\"".repeat(100),
            id: u32::MAX.to_string(),
            conn: "ffffffffffffffff-65535-4294967295-18446744073709551615".into(),
            remote: "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535".into(),
            path: "/\\\"\u{7f}é".repeat(1000),
            age_secs: f64::MAX,
            bytes_in: u64::MAX,
            bytes_out: u64::MAX,
            messages_in: u64::MAX,
            messages_out: u64::MAX,
            send_queue: u64::MAX,
            state: ConnStage::Handshake,
            protocol: Some("\u{1}".repeat(300)),
            extensions: "permessage-deflate; server_max_window_bits=\"1\u{1}\"".repeat(9),
        };
        let json = serde_json::to_vec(&row).unwrap().len();
        assert!(
            json <= row_bytes_bound(&row),
            "{json} > {}",
            row_bytes_bound(&row)
        );
        let plain = ConnInfo {
            path: String::new(),
            protocol: None,
            ..row
        };
        let json = serde_json::to_vec(&plain).unwrap().len();
        assert!(json <= row_bytes_bound(&plain), "{json}");
    }

    /// A master that sends lines, some with a descriptor, over a real socketpair.
    fn pair() -> (std::os::unix::net::UnixStream, Channel) {
        let (master, worker) = std::os::unix::net::UnixStream::pair().unwrap();
        worker.set_nonblocking(true).unwrap();
        (master, Channel::new(UnixStream::from_std(worker)))
    }

    /// Sends `line` with a descriptor of `file` attached, as the master does.
    fn send_with_fd(master: &std::os::unix::net::UnixStream, line: &[u8], file: &std::fs::File) {
        let sent = sys::send_with_fd(master.as_raw_fd(), line, file.as_raw_fd()).unwrap();
        assert_eq!(sent, line.len());
    }

    #[test]
    fn reopen_logs_gets_the_descriptor_sent_with_it_and_strays_are_closed() {
        let (mut master, mut channel) = pair();
        let log = tempfile::NamedTempFile::new().unwrap();
        let null = std::fs::File::open("/dev/null").unwrap();
        send_with_fd(&master, b"{\"cmd\":\"reopen_logs\"}\n", log.as_file());
        master.write_all(b"{\"cmd\":\"reopen_logs\"}\n").unwrap();
        let (mut commands, open) = channel.read();
        assert!(open);
        assert_eq!(commands.len(), 2);
        assert!(matches!(commands[1], (ToWorker::ReopenLogs, None)));
        let Some((ToWorker::ReopenLogs, Some(fd))) = commands.drain(..1).next() else {
            panic!("the first reopen_logs has no descriptor")
        };
        std::fs::File::from(fd)
            .write_all(b"written by the worker")
            .unwrap();
        assert_eq!(
            std::fs::read_to_string(log.path()).unwrap(),
            "written by the worker",
            "the descriptor received is the log file sent"
        );

        // A descriptor with a line that is not reopen_logs is closed, not kept for later.
        send_with_fd(
            &master,
            b"{\"cmd\":\"list_connections\",\"query\":7}\n",
            &null,
        );
        let (commands, _) = channel.read();
        assert!(matches!(
            commands[..],
            [(ToWorker::ListConnections { query: 7 }, None)]
        ));
        assert!(channel.fds.is_empty());

        // A line read in two parts keeps its descriptor until it is whole.
        send_with_fd(&master, b"{\"cmd\":\"reopen", &null);
        let (commands, _) = channel.read();
        assert!(commands.is_empty());
        master.write_all(b"_logs\"}\n").unwrap();
        let (commands, _) = channel.read();
        assert!(matches!(commands[..], [(ToWorker::ReopenLogs, Some(_))]));

        drop(master);
        assert!(!channel.read().1, "the master's end closing is reported");
    }

    #[test]
    fn connection_lists_go_out_as_json_lines_of_500_rows_or_512_kib() {
        // Sends rows given as (id, path length); returns what the master reads, per line:
        // (rows, last, first id, bytes).
        let lines = |rows: Vec<(usize, usize)>| {
            let (master, mut channel) = pair();
            let reader = std::thread::spawn(move || {
                let mut got = Vec::new();
                for line in io::BufRead::lines(io::BufReader::new(master)) {
                    let line = line.unwrap();
                    match serde_json::from_str(&line).unwrap() {
                        FromWorker::Connections { query, conns, last } => {
                            assert_eq!(query, 9);
                            let first = conns.first().map(|c| c.id.clone()).unwrap_or_default();
                            got.push((conns.len(), last, first, line.len()));
                        }
                        other => panic!("unexpected {other:?}"),
                    }
                }
                got
            });
            let rows = rows.into_iter().map(|(id, path)| ConnInfo {
                id: id.to_string(),
                path: "/".repeat(path),
                state: ConnStage::Open,
                ..ConnInfo::default()
            });
            channel.answer_connections(9, rows);
            // What the socket did not take at once waits for the loop's next writable event.
            while !channel.out.is_empty() {
                channel.flush();
            }
            drop(channel);
            reader.join().unwrap()
        };
        let got = lines((1..=1200).map(|id| (id, 1)).collect());
        let shape: Vec<_> = got
            .iter()
            .map(|(n, last, id, _)| (*n, *last, id.as_str()))
            .collect();
        assert_eq!(
            shape,
            [(500, false, "1"), (500, false, "501"), (200, true, "1001")]
        );
        assert_eq!(lines(Vec::new()).len(), 1, "one empty last line");

        // Client-chosen 8 KiB paths: fewer rows per line, every line well under 1 MiB.
        let got = lines((1..=500).map(|id| (id, 8 << 10)).collect());
        assert!(got.len() > 1);
        assert_eq!(got.iter().map(|l| l.0).sum::<usize>(), 500);
        assert!(got.iter().all(|l| l.3 <= CONNS_LINE_BYTES), "{got:?}");
        assert!(got.last().unwrap().1);
    }
}
