//! `wsd status` as a Workerman-style table, and `wsd connections` as a table.

use crate::control::{BusStatus, ClusterState, Connections, Status};
use std::fmt::Write;

pub fn render(st: &Status) -> String {
    let mut out = String::new();
    let m = &st.master;
    let started = chrono::DateTime::from_timestamp(m.started_at, 0)
        .map(|t| {
            t.with_timezone(&chrono::Local)
                .format("%Y-%m-%d %H:%M:%S")
                .to_string()
        })
        .unwrap_or_default();
    let up = m.uptime_secs;
    let processes: usize = st.groups.iter().map(|g| g.count).sum();
    let _ = writeln!(out, "{:-^142}", " GLOBAL STATUS ");
    let _ = writeln!(
        out,
        "wsd version: {:<20} master pid: {:<10} config: {}",
        m.version, m.pid, m.config
    );
    let _ = writeln!(
        out,
        "start time: {started}   run {} days {} hours {} minutes   master memory: {}",
        up / 86400,
        up % 86400 / 3600,
        up % 3600 / 60,
        human(m.memory)
    );
    let [l1, l5, l15] = m.load_average;
    let _ = writeln!(out, "load average: {l1:.2}, {l5:.2}, {l15:.2}");
    if let Some(bus) = &st.bus {
        let _ = writeln!(out, "{}", bus_line(bus));
    }
    if let Some(api) = &st.api {
        let _ = writeln!(
            out,
            "api: {} (group {}) — {} requests, {:.1}/s",
            api.listen, api.group, api.requests, api.rate
        );
    }
    if let Some(url) = &st.metrics {
        let _ = writeln!(out, "metrics: {url}/metrics, {url}/health");
    }
    let _ = writeln!(
        out,
        "{} group(s)   {processes} process(es)",
        st.groups.len()
    );
    let _ = writeln!(out, "{:<20} {:<30} exit_count", "group", "exit_status");
    for g in &st.groups {
        if g.exits.is_empty() {
            let _ = writeln!(out, "{:<20} {:<30} {}", g.name, "-", 0);
        }
        for (how, n) in &g.exits {
            let _ = writeln!(out, "{:<20} {:<30} {n}", g.name, how);
        }
    }
    let _ = writeln!(out, "{:-^142}", " PROCESS STATUS ");
    let header = [
        "pid",
        "memory",
        "listening",
        "name",
        "connections",
        "accept_q",
        "send_queue",
        "send_fail",
        "bus_drop",
        "timers",
        "total_request",
        "qps",
        "status",
    ];
    let _ = writeln!(out, "{}", row(&header.map(String::from)));
    let (mut mem, mut conns, mut fails, mut timers, mut total, mut qps) = (0, 0, 0, 0, 0, 0.0);
    let (mut queued, mut accepted, mut bus_dropped) = (0, 0, 0);
    for w in &st.workers {
        let c = &w.counters;
        mem += c.memory;
        conns += c.connections;
        queued += c.send_queue;
        bus_dropped += c.bus_dropped;
        accepted += c.accepted;
        fails += c.send_fail;
        timers += c.timers;
        total += c.total_request;
        qps += w.qps;
        let _ = writeln!(
            out,
            "{}",
            row(&[
                w.pid.to_string(),
                human(c.memory),
                w.listen.clone(),
                format!("{}#{}", w.name, w.slot),
                c.connections.to_string(),
                format!("{}/{}", w.accept_queue, w.backlog),
                human(c.send_queue),
                c.send_fail.to_string(),
                c.bus_dropped.to_string(),
                c.timers.to_string(),
                c.total_request.to_string(),
                format!("{:.1}", w.qps),
                format!("[{}]", w.status),
            ])
        );
    }
    let _ = writeln!(out, "{:-^142}", " Summary ");
    let _ = write!(
        out,
        "{}",
        row(&[
            "Summary".into(),
            human(mem),
            "-".into(),
            "-".into(),
            conns.to_string(),
            format!("{accepted} acc"),
            human(queued),
            fails.to_string(),
            bus_dropped.to_string(),
            timers.to_string(),
            total.to_string(),
            format!("{qps:.1}"),
            "[Summary]".into(),
        ])
    );
    out
}

/// `bus: redis://127.0.0.1:6379/0 — up on 4/4 workers`, naming the workers that report it down.
fn bus_line(bus: &BusStatus) -> String {
    let (url, up, all) = (&bus.url, bus.workers_up, bus.workers);
    let mut line = if bus.state == ClusterState::Up {
        format!("bus: {url} — up on {up}/{all} workers")
    } else {
        format!("bus: {url} — {} (up on {up}/{all} workers)", bus.state)
    };
    if !bus.down_on.is_empty() {
        let _ = write!(line, "; redis unreachable from {}", bus.down_on.join(", "));
    }
    line
}

fn row(cells: &[String; 13]) -> String {
    let widths = [8, 8, 30, 14, 12, 10, 10, 10, 9, 7, 14, 9, 10];
    let mut s = String::new();
    for (cell, w) in cells.iter().zip(widths) {
        let _ = write!(s, "{cell:<w$} ");
    }
    s.trim_end().to_string()
}

/// One row per connection, sorted by worker and age.
pub fn render_connections(c: &Connections) -> String {
    let mut rows: Vec<_> = c.conns.iter().collect();
    rows.sort_by(|a, b| {
        (a.pid, a.age_secs)
            .partial_cmp(&(b.pid, b.age_secs))
            .unwrap_or(std::cmp::Ordering::Equal)
    });
    let mut out = format!(
        "{:<8} {:<12} {:<8} {:<24} {:<16} {:>9} {:>10} {:>10} {:>8} {:>8} {:>10} {:<9} {:<18} {}\n",
        "pid",
        "worker",
        "id",
        "remote",
        "path",
        "age",
        "bytes_in",
        "bytes_out",
        "msgs_in",
        "msgs_out",
        "send_queue",
        "state",
        "extensions",
        "protocol"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<8} {:<12} {:<8} {:<24} {:<16} {:>8.1}s {:>10} {:>10} {:>8} {:>8} {:>10} {:<9} {:<18} {}",
            r.pid,
            r.worker,
            r.id,
            r.remote,
            crate::escaped(&r.path).to_string(),
            r.age_secs,
            r.bytes_in,
            r.bytes_out,
            r.messages_in,
            r.messages_out,
            r.send_queue,
            r.state.to_string(),
            if r.extensions.is_empty() {
                "-"
            } else {
                &r.extensions
            },
            r.protocol
                .as_deref()
                .map_or("-".into(), |p| crate::escaped(p).to_string())
        );
    }
    let _ = writeln!(out, "{} connection(s)", c.conns.len());
    if !c.missing.is_empty() {
        let pids: Vec<String> = c.missing.iter().map(i32::to_string).collect();
        let _ = writeln!(
            out,
            "not answering (busy; their connections are missing above): pid {}",
            pids.join(", ")
        );
    }
    out
}

/// `2.1M`, `512K`.
fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 => format!("{:.1}G", b as f64 / (1u64 << 30) as f64),
        b if b >= 1 << 20 => format!("{:.1}M", b as f64 / (1u64 << 20) as f64),
        b => format!("{}K", b >> 10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bus_line_says_where_redis_is_reached() {
        let mut bus = BusStatus {
            url: "redis://127.0.0.1:6379/0".into(),
            state: ClusterState::Up,
            workers_up: 4,
            workers: 4,
            down_on: Vec::new(),
        };
        assert_eq!(
            bus_line(&bus),
            "bus: redis://127.0.0.1:6379/0 — up on 4/4 workers"
        );
        bus.state = ClusterState::Down;
        bus.workers_up = 2;
        bus.down_on = vec!["chat#0".into(), "chat#3".into()];
        assert_eq!(
            bus_line(&bus),
            "bus: redis://127.0.0.1:6379/0 — down (up on 2/4 workers); \
             redis unreachable from chat#0, chat#3"
        );
    }
}
