//! `wsd bench connect`: what a handshake costs the server, in two phases.
//!
//! 1. The burst: N connections upgrade as fast as the client allows (waves of in-flight
//!    handshakes, see [`super::client::WAVE`]), before `go`; the figure is the time from the
//!    first connect to the last upgrade, and upgrades per second. It is what a server meets
//!    when every client comes back at once after a restart.
//! 2. The sustained phase (`--secs`, unless 0): a fixed set of slots each loops connect →
//!    upgrade → close → again, and the figure is handshakes per second. Each close is a
//!    proper close handshake (Close 1000, then the server's Close and EOF; see
//!    [`super::client`]), so the server pays for the whole life of a connection, and a server
//!    that fumbles its closing shows up as errors rather than being cut short by a reset.
//!
//! The burst's connections stay open through the sustained phase, so the cycles run against
//! a server that is holding N clients, as a real one would be.
//!
//! TIME_WAIT: the server closes first, so the state lands on the server's side, where it
//! costs no ports; source addresses rotate over 127.0.0.1–250 as slots restart, so the
//! client's ephemeral ports do not run out either. No SO_LINGER 0: a reset would hide a
//! server that does not close.

use super::client::{Driver, Out, Pool};
use super::report::{self, Counts, Summary};
use super::shard::Workload;
use super::wire::{BadReply, Frame};
use super::{Plan, Work};
use hdrhistogram::Histogram;
use serde_json::json;

pub struct Connect {
    /// The burst's connections are `0..burst`; the slots follow from `go` on.
    burst: usize,
    slots: usize,
    burst_open: usize,
    secs: u64,
    /// The sustained phase ends at this time (ns); none runs before `go`.
    end: Option<u64>,
    /// Slots that finished their upgrade and are to be closed, and slots that finished
    /// closing and are to connect again (capacity `slots`, never grown).
    to_close: Vec<usize>,
    to_restart: Vec<usize>,
    counts: Counts,
    burst_latency: Histogram<u64>,
    latency: Histogram<u64>,
}

impl Connect {
    pub fn new(burst: usize, slots: usize, secs: u64) -> Connect {
        Connect {
            burst,
            slots,
            burst_open: 0,
            secs,
            end: None,
            to_close: Vec::with_capacity(slots),
            to_restart: Vec::with_capacity(slots),
            counts: Counts::default(),
            burst_latency: report::histogram(),
            latency: report::histogram(),
        }
    }

    fn measuring(&self, now: u64) -> bool {
        self.end.is_some_and(|end| now < end)
    }
}

impl Driver for Connect {
    fn opened(&mut self, id: usize, handshake_ns: u64, _out: &mut Out<'_>, now: u64) {
        if id < self.burst {
            self.burst_open += 1;
            self.burst_latency.saturating_record(handshake_ns);
            return;
        }
        if self.measuring(now) {
            self.counts.messages += 1;
            self.latency.saturating_record(handshake_ns);
        }
        self.to_close.push(id);
    }

    fn data(&mut self, _: usize, _: Frame<'_>, _: &mut Out<'_>, _: u64) -> Result<(), BadReply> {
        Ok(()) // a greeting from the server (the relay app's `id ...`, say) is no error
    }

    fn closed(&mut self, id: usize, _now: u64) {
        self.to_restart.push(id);
    }
}

impl Workload for Connect {
    fn ready(&self, _pool: &Pool) -> usize {
        self.burst_open
    }

    fn go(&mut self, t0: u64, now: u64, pool: &mut Pool) {
        self.end = Some(t0 + self.secs * 1_000_000_000);
        if self.secs > 0 && self.slots > 0 {
            pool.grow(self.slots);
            self.counts.sent += self.slots as u64;
            pool.start_wave(now);
        }
    }

    /// Closes the slots that are up and reconnects the ones that are closed.
    fn tick(&mut self, now: u64, pool: &mut Pool) -> Option<u64> {
        if !self.measuring(now) {
            return None;
        }
        for id in self.to_close.drain(..) {
            pool.close(id, now);
        }
        for id in self.to_restart.drain(..) {
            pool.restart(id);
            self.counts.sent += 1;
        }
        pool.start_wave(now);
        None
    }

    fn done(&self, now: u64, _pool: &Pool) -> bool {
        self.end.is_some_and(|end| now >= end)
    }

    fn measured(&self, pool: &Pool) -> (usize, usize) {
        let open = (0..self.burst).filter(|&id| pool.is_open(id)).count();
        (self.burst_open, open)
    }

    fn counts(&self) -> Counts {
        self.counts
    }

    fn latency(&self) -> &Histogram<u64> {
        &self.latency
    }

    fn burst_latency(&self) -> Option<&Histogram<u64>> {
        Some(&self.burst_latency)
    }
}

/// Burst: upgrades and their rate over the time from the first connect to the last upgrade.
fn burst(s: &Summary) -> (f64, f64) {
    let secs = s.connecting.map_or(0.0, |c| c.secs());
    let rate = if secs > 0.0 {
        s.ready as f64 / secs
    } else {
        0.0
    };
    (secs, rate)
}

/// Connect's own figures for `--json`.
pub fn json(plan: &Plan, s: &Summary) -> serde_json::Value {
    let Work::Connect { slots } = plan.work else {
        return json!({});
    };
    let (secs, rate) = burst(s);
    let sustained = (plan.secs > 0).then(|| {
        json!({
            "slots": slots,
            "handshakes": s.counts.messages,
            "handshakes_per_sec": (s.counts.messages as f64 / plan.secs as f64).round(),
            "latency_us": report::quantiles_us(&s.latency),
        })
    });
    json!({
        "burst": {
            "upgrades": s.ready,
            "secs": report::round(secs, 3),
            "upgrades_per_sec": rate.round(),
            "latency_us": report::quantiles_us(&s.burst_latency),
        },
        "sustained": sustained,
    })
}

/// Connect's rows of the table.
pub fn rows(plan: &Plan, s: &Summary, url: &str) -> String {
    let Work::Connect { slots } = plan.work else {
        return String::new();
    };
    let (secs, rate) = burst(s);
    let mut t = format!(
        "wsd bench connect  {url}  a burst of {}, then {slots} slots cycling for {} s\n\
         burst        {} upgrades in {secs:.3} s, {rate:.0} upgrades/s, {} open at the end\n",
        plan.conns, plan.secs, s.ready, s.open,
    );
    t += &report::latency_row("  handshake", &s.burst_latency);
    if plan.secs > 0 {
        t += &format!(
            "sustained    {} connect/upgrade/close cycles, {:.0} handshakes/s\n",
            s.counts.messages,
            s.counts.messages as f64 / plan.secs as f64,
        );
        t += &report::latency_row("  handshake", &s.latency);
    }
    t
}
