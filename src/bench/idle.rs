//! `wsd bench idle`: what an idle connection costs the server in memory.
//!
//! N connections each send one echo message and wait for it (so every connection has been
//! through the server's read and write paths, and whatever buffers those allocate are
//! counted), then sit. The coordinator reads the server's workers' `/proc/<pid>/smaps_rollup`
//! before the first connect and again at the end of `--hold` seconds, with every connection
//! still open, then tells the client processes to stop; (after − before) / N is the memory
//! one connection costs. The connections spread over client processes and source addresses
//! like every mode's (each process holds what its file limit allows).
//!
//! Pss is the headline: forked workers share their pages with the master, and the pages a
//! worker writes become its own; Rss would count a shared page in full in every worker.
//!
//! With `--again-when FILE` the run goes on after the hold: every connection stays open until
//! FILE exists, then each that is still open echoes once more. Whatever was done to the
//! server in between (`scripts/bench-handoff.sh` reloads it, and the new workers must take
//! the connections over) shows as connections the server closed and echoes that never came
//! back; a connection that is open but silent could not be told apart from a good one
//! without this second echo. The file, not a timer, says when, so that the script decides
//! how long the connections are held and the run waits for it however long that takes.

use super::client::{Driver, Out, Pool};
use super::payload::Messages;
use super::report::{self, Counts, Summary};
use super::server::{Memory, ServerRun};
use super::shard::Workload;
use super::wire::{BadReply, Frame};
use super::{Plan, SEC, Work};
use hdrhistogram::Histogram;
use serde_json::json;

pub struct Idle {
    messages: Messages,
    size: usize,
    /// When each connection sent its message (ns), `u64::MAX` once it is echoed.
    sent_at: Vec<u64>,
    echoed: usize,
    counts: Counts,
    latency: Histogram<u64>,
    /// When the connections were asked to echo again (`--again-when`).
    again_at: Option<u64>,
}

const ECHOED: u64 = u64::MAX;

/// How long `--again-when` waits for its file once the hold is over (the script that makes
/// it is stuck, or gone, past that).
pub const AGAIN_WAIT_NS: u64 = 600 * SEC;

/// How long the connections have to echo again: an echo that has not come back by then is
/// counted as missing.
pub const AGAIN_TIMEOUT_NS: u64 = 10 * SEC;

impl Idle {
    pub fn new(conns: usize, messages: Messages) -> Idle {
        Idle {
            size: messages.size(),
            messages,
            sent_at: vec![0; conns],
            echoed: 0,
            counts: Counts::default(),
            latency: report::histogram(),
            again_at: None,
        }
    }

    /// Connection `id`'s echo, `len` bytes, came back at `now`.
    fn echoed(&mut self, id: usize, len: usize, now: u64) -> Result<(), BadReply> {
        if self.sent_at[id] == ECHOED {
            return Err(BadReply::Twice);
        }
        if len != self.size {
            return Err(BadReply::Size {
                got: len,
                sent: self.size,
            });
        }
        if self.again_at.is_some() {
            self.sent_at[id] = ECHOED;
            self.counts.again_echoed += 1;
            return Ok(());
        }
        self.latency
            .saturating_record(now.saturating_sub(self.sent_at[id]));
        self.sent_at[id] = ECHOED;
        self.echoed += 1;
        self.counts.messages += 1;
        self.counts.bytes += self.size as u64;
        Ok(())
    }

    /// Connection `id` (echoed once, open) is asked to echo again at `now`.
    fn asked_again(&mut self, id: usize, now: u64) {
        self.sent_at[id] = now;
        self.counts.again_asked += 1;
    }

    /// After `again`, with `open` connections still open: every one of them has echoed again
    /// (the rest were closed), or the time for it is up.
    fn again_over(&self, open: usize, now: u64) -> bool {
        self.again_at.is_some_and(|at| {
            self.counts.again_echoed >= open as u64 || now >= at + AGAIN_TIMEOUT_NS
        })
    }
}

impl Driver for Idle {
    fn opened(&mut self, id: usize, _handshake_ns: u64, out: &mut Out<'_>, now: u64) {
        out.put(&self.messages, id % self.messages.len());
        self.sent_at[id] = now;
        self.counts.sent += 1;
    }

    fn data(
        &mut self,
        id: usize,
        frame: Frame<'_>,
        _out: &mut Out<'_>,
        now: u64,
    ) -> Result<(), BadReply> {
        if !frame.fin {
            return Ok(());
        }
        self.echoed(id, frame.payload.len(), now)
    }
}

impl Workload for Idle {
    /// A connection is ready once its message came back.
    fn ready(&self, _pool: &Pool) -> usize {
        self.echoed
    }

    fn go(&mut self, _t0: u64, _now: u64, _pool: &mut Pool) {}

    /// One more echo on every connection that is open and has echoed once.
    fn again(&mut self, now: u64, pool: &mut Pool) {
        self.again_at = Some(now);
        for id in 0..self.sent_at.len() {
            if pool.is_open(id) && self.sent_at[id] == ECHOED {
                let which = id % self.messages.len();
                pool.send(id, |out| out.put(&self.messages, which));
                self.asked_again(id, now);
            }
        }
    }

    /// Not by itself, unless asked to echo again: the coordinator says `stop` once it has
    /// read the server's memory.
    fn done(&self, now: u64, pool: &Pool) -> bool {
        self.again_over(pool.open(), now)
    }

    fn counts(&self) -> Counts {
        self.counts
    }

    fn latency(&self) -> &Histogram<u64> {
        &self.latency
    }
}

/// The change in one worker's memory between two samples (KiB; negative if it shrank).
fn delta(before: Option<Memory>, after: Option<Memory>) -> Option<(i64, i64)> {
    let (b, a) = (before?, after?);
    Some((
        a.rss_kib as i64 - b.rss_kib as i64,
        a.pss_kib as i64 - b.pss_kib as i64,
    ))
}

fn per_conn(kib: i64, conns: u64) -> Option<f64> {
    report::per(kib as f64, conns).map(|x| report::round(x, 2))
}

/// The server's memory before and after, per worker and in total, with KiB per connection.
pub fn memory_json(run: &ServerRun, conns: usize) -> serde_json::Value {
    let Some(held) = &run.held else {
        return json!(null);
    };
    let mut total = (0i64, 0i64);
    let mut workers = Vec::new();
    for (i, &pid) in run.procs.workers.iter().enumerate() {
        let before = run.start.memory.get(i).copied().flatten();
        let after = held.memory.get(i).copied().flatten();
        let d = delta(before, after);
        if let Some((rss, pss)) = d {
            total = (total.0 + rss, total.1 + pss);
        }
        let held_conns = run.connections.as_ref().and_then(|c| c.get(i).copied());
        workers.push(json!({
            "pid": pid,
            "rss_kib_before": before.map(|m| m.rss_kib),
            "rss_kib_after": after.map(|m| m.rss_kib),
            "pss_kib_before": before.map(|m| m.pss_kib),
            "pss_kib_after": after.map(|m| m.pss_kib),
            "connections": held_conns,
            "pss_kib_per_conn": d.zip(held_conns).and_then(|((_, pss), n)| per_conn(pss, n)),
        }));
    }
    json!({
        "workers": workers,
        "rss_kib_total": total.0,
        "pss_kib_total": total.1,
        "rss_kib_per_conn": per_conn(total.0, conns as u64),
        "pss_kib_per_conn": per_conn(total.1, conns as u64),
    })
}

/// The memory rows of the table, from [`memory_json`]'s figures.
pub fn memory_rows(m: &serde_json::Value) -> String {
    let mut t = format!(
        "memory       +{} KiB Pss (+{} KiB Rss) in all: {} KiB Pss ({} KiB Rss) per connection\n",
        m["pss_kib_total"], m["rss_kib_total"], m["pss_kib_per_conn"], m["rss_kib_per_conn"]
    );
    for w in m["workers"].as_array().into_iter().flatten() {
        let gain = w["pss_kib_after"]
            .as_i64()
            .zip(w["pss_kib_before"].as_i64());
        t += &format!(
            "  pid {:<8} Pss {} → {} KiB ({:+}), {} connections, {} KiB per connection\n",
            w["pid"],
            w["pss_kib_before"],
            w["pss_kib_after"],
            gain.map_or(0, |(a, b)| a - b),
            w["connections"],
            w["pss_kib_per_conn"],
        );
    }
    t
}

/// Idle's own figures for `--json` (the memory is in `server`).
pub fn json(plan: &Plan, s: &Summary) -> serde_json::Value {
    let Work::Idle { size, ref again } = plan.work else {
        return json!({});
    };
    let mut v = json!({ "size": size, "hold": plan.secs, "echoed": s.counts.messages });
    if again.is_some() {
        let (asked, echoed) = (s.counts.again_asked, s.counts.again_echoed);
        v["again"] = json!({
            "asked": asked,
            "echoed": echoed,
            "missing": asked.saturating_sub(echoed),
            "closed": s.ready.saturating_sub(s.open),
        });
    }
    v
}

/// Idle's rows of the table.
pub fn rows(plan: &Plan, s: &Summary, url: &str) -> String {
    let Work::Idle { size, ref again } = plan.work else {
        return String::new();
    };
    let secs = s.connecting.map_or(0.0, |c| c.secs());
    let mut t = format!(
        "wsd bench idle  {url}  {} connections, one {size}-byte echo each, held {} s\n\
         connections  {} echoed and held, up in {secs:.2} s, {} open at the end\n",
        plan.conns, plan.secs, s.ready, s.open,
    );
    t += &report::latency_row("first echo", &s.latency);
    if let Some(file) = again {
        let (asked, echoed) = (s.counts.again_asked, s.counts.again_echoed);
        t += &format!(
            "again        {echoed} of {asked} echoed again once {} appeared, {} missing; \
             {} closed since their first echo\n",
            file.display(),
            asked.saturating_sub(echoed),
            s.ready.saturating_sub(s.open),
        );
    }
    if s.server.is_none() {
        t += "memory       (give --config or --pid to read the server's)\n";
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::server::{Procs, Sample};

    #[test]
    fn after_again_each_connection_echoes_once_more_and_the_run_ends() {
        let mut idle = Idle::new(3, Messages::new(vec![b"abc".to_vec()]));
        for id in 0..3 {
            idle.echoed(id, 3, 10).unwrap();
        }
        assert!(matches!(idle.echoed(0, 3, 11), Err(BadReply::Twice)));
        assert!(!idle.again_over(3, u64::MAX), "not before again");
        // Connection 2 was closed in between: two asked, and two open.
        idle.again_at = Some(100);
        idle.asked_again(0, 100);
        idle.asked_again(1, 100);
        idle.echoed(0, 3, 150).unwrap();
        assert!(!idle.again_over(2, 200), "connection 1 has not echoed yet");
        assert!(idle.again_over(2, 100 + AGAIN_TIMEOUT_NS), "the time is up");
        idle.echoed(1, 3, 160).unwrap();
        assert!(idle.again_over(2, 200));
        assert!(matches!(idle.echoed(1, 3, 170), Err(BadReply::Twice)));
        let c = idle.counts;
        assert_eq!((c.messages, c.again_asked, c.again_echoed), (3, 2, 2));
        assert_eq!(
            idle.latency.len(),
            3,
            "the second echoes are not first echoes"
        );
    }

    #[test]
    fn memory_per_connection_is_the_growth_over_the_connections() {
        let mem = |rss_kib, pss_kib| Some(Memory { rss_kib, pss_kib });
        let run = ServerRun {
            procs: Procs::of(vec![10, 11]),
            start: Sample::for_test(vec![mem(1000, 600), mem(1000, 600)]),
            go: None,
            held: Some(Sample::for_test(vec![mem(3000, 2600), mem(5000, 4600)])),
            end: None,
            connections: Some(vec![500, 1000]),
        };
        let m = memory_json(&run, 1500);
        assert_eq!(m["pss_kib_total"], 6000);
        assert_eq!(m["pss_kib_per_conn"], 4.0);
        assert_eq!(m["workers"][0]["pss_kib_per_conn"], 4.0);
        assert_eq!(m["workers"][1]["connections"], 1000);
        assert!(
            memory_rows(&m).contains("+6000 KiB Pss"),
            "{}",
            memory_rows(&m)
        );
    }
}
