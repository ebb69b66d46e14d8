//! What the master answers on its control socket: status, the connections view (gathered
//! from every worker without waiting on any of them), log reopening — and the dispatch of
//! each request to it. Stop and reload are begun here and carried out by the loop.

use super::ReopenError;
use super::event_loop::Master;
use super::supervisor;
use crate::control::{
    ConnInfo, Connections, GroupStatus, MasterStatus, Reply, Request, Status, ToWorker,
};
use crate::sys;
use mio::Registry;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant, SystemTime};

/// How long `wsd connections` waits for a busy worker's rows.
const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// A `wsd connections` request collecting rows from the workers.
pub(super) struct Query {
    pub(super) id: u64,
    client: usize,
    /// Workers that have not sent their last rows yet.
    waiting: Vec<usize>,
    result: Connections,
    pub(super) deadline: Instant,
}

impl Master {
    // ---- logs ---------------------------------------------------------------------------

    /// Reopens `log_file` (a daemon's output) and hands it to every worker.
    pub(super) fn reopen_logs(&mut self) -> Result<String, ReopenError> {
        if !self.daemon {
            return Err(ReopenError::NotDaemon);
        }
        let path = &self.server.log_file;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| ReopenError::Open {
                path: path.clone(),
                source,
            })?;
        sys::redirect_output(file.as_raw_fd()).map_err(ReopenError::Redirect)?;
        let keys: Vec<usize> = self.sup.procs.iter().map(|(k, _)| k).collect();
        let told = keys
            .iter()
            .filter(|&&k| {
                self.sup
                    .tell_with_fd(k, &ToWorker::ReopenLogs, file.as_raw_fd())
            })
            .count();
        log::info!("reopened {} (master and {told} worker(s))", path.display());
        Ok(format!(
            "reopened {} (master and {told} worker(s))",
            path.display()
        ))
    }

    // ---- control requests ---------------------------------------------------------------

    pub(super) fn request(&mut self, key: usize, req: Request, registry: &Registry) {
        let reply = match req {
            Request::Status => Reply {
                status: Some(self.status()),
                ..Reply::ok()
            },
            Request::Stop { mode } => {
                self.begin_stop(mode, "wsd stop", registry);
                if let (Some(st), Some(stream)) =
                    (&mut self.stopping, self.clients.detach(key, registry))
                {
                    st.waiters.push(stream);
                }
                return;
            }
            Request::Reload => match self.begin_reload(
                "wsd reload",
                Some(key),
                super::reload::Scope::All,
                registry,
            ) {
                Ok(()) => return,
                Err(e) => Reply::error(format!("reload refused: {e}")),
            },
            Request::ReopenLogs => match self.reopen_logs() {
                Ok(m) => Reply {
                    message: Some(m),
                    ..Reply::ok()
                },
                Err(e) => Reply::error(e.to_string()),
            },
            Request::Connections => return self.ask_connections(key, registry),
            Request::Upgrade { binary } => match self.begin_upgrade(Some(key), binary) {
                Ok(()) => return,
                Err(e) => Reply::error(format!("upgrade refused: {e}")),
            },
        };
        self.clients.reply(key, &reply, registry);
    }

    pub(super) fn ask_connections(&mut self, client: usize, registry: &Registry) {
        self.next_query += 1;
        let id = self.next_query;
        let keys: Vec<usize> = self.sup.procs.iter().map(|(k, _)| k).collect();
        let waiting = keys
            .into_iter()
            .filter(|&k| self.sup.tell(k, &ToWorker::ListConnections { query: id }))
            .collect();
        let q = Query {
            id,
            client,
            waiting,
            result: Connections::default(),
            deadline: Instant::now() + QUERY_TIMEOUT,
        };
        if q.waiting.is_empty() {
            self.answer_query(q, registry);
        } else {
            self.queries.push(q);
        }
    }

    pub(super) fn add_rows(&mut self, key: usize, rows: supervisor::ConnRows, registry: &Registry) {
        let Some(i) = self.queries.iter().position(|q| q.id == rows.query) else {
            return;
        };
        let Some(p) = self.sup.procs.get(key) else {
            return;
        };
        let worker = format!("{}#{}", p.group, p.slot);
        let q = &mut self.queries[i];
        q.result
            .conns
            .extend(rows.conns.into_iter().map(|c| ConnInfo {
                pid: p.pid.as_raw(),
                worker: worker.clone(),
                ..c
            }));
        if rows.last {
            q.waiting.retain(|&k| k != key);
            if q.waiting.is_empty() {
                let q = self.queries.swap_remove(i);
                self.answer_query(q, registry);
            }
        }
    }

    /// A worker that exited will not answer: stop waiting for it.
    pub(super) fn forget_in_queries(&mut self, key: usize, registry: &Registry) {
        for q in &mut self.queries {
            q.waiting.retain(|&k| k != key);
        }
        while let Some(i) = self.queries.iter().position(|q| q.waiting.is_empty()) {
            let q = self.queries.swap_remove(i);
            self.answer_query(q, registry);
        }
    }

    pub(super) fn answer_query(&mut self, mut q: Query, registry: &Registry) {
        q.result.missing = q
            .waiting
            .iter()
            .filter_map(|&k| self.sup.procs.get(k).map(|p| p.pid.as_raw()))
            .collect();
        let reply = Reply {
            connections: Some(q.result),
            ..Reply::ok()
        };
        self.clients.reply(q.client, &reply, registry);
    }

    pub(super) fn status(&self) -> Status {
        let started_at = self
            .started
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let workers = self.sup.worker_rows();
        Status {
            master: MasterStatus {
                pid: std::process::id() as i32,
                version: crate::VERSION.into(),
                binary: self.exe.display().to_string(),
                config: self.config_label.clone(),
                started_at,
                uptime_secs: self.started_at.elapsed().as_secs(),
                load_average: sys::load_average(),
                memory: sys::rss_bytes(),
            },
            groups: self
                .sup
                .groups
                .iter()
                .map(|g| GroupStatus {
                    name: g.name().into(),
                    listen: g.listen.clone(),
                    count: g.slots.len(),
                    exits: g.exits.clone(),
                })
                .collect(),
            bus: self
                .server
                .bus
                .as_ref()
                .map(|url| super::bus_watch::summary(url.redacted(), &workers)),
            api: self.sup.api.as_ref().map(|a| {
                let served = workers.iter().filter(|w| w.name == a.group);
                let (requests, rate) = served.fold((0, 0.0), |(n, r), w| {
                    (n + w.counters.api_requests, r + w.api_rate)
                });
                crate::control::ApiStatus {
                    listen: a.url(),
                    group: a.group.clone(),
                    requests,
                    rate: (rate * 10.0f64).round() / 10.0,
                }
            }),
            metrics: self.metrics.as_ref().map(|m| m.url.clone()),
            workers,
        }
    }
}
