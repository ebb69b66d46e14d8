//! Upgrades that wait for the handler's decision (`authorize = true`, and always with a
//! webhook): the handshake authentication flow, in any language.
//!
//! A valid upgrade request (origin, limits, subprotocol and token checked) is held here instead
//! of being answered, and the handler gets a `connect` event with `"decide": true`. Its
//! `accept` (with a user to bind and topics to subscribe) or `reject` (with a status) settles
//! it, as does a webhook's answer; after `connect_timeout` it is refused with 503. A handler
//! that dies while upgrades wait gets them again after the replay of its restart.

use super::event_loop::{Loop, Upgrade};
use super::upgrade::Decision;
use super::webhook::Kind;
use crate::ConnId;
use crate::exec::protocol::{self, Connecting};
use std::collections::HashMap;
use std::time::{Duration, Instant};

struct Waiting {
    upgrade: Upgrade,
    /// Its `connect` line, sent again to a restarted handler.
    line: Vec<u8>,
    deadline: Instant,
}

/// The upgrades waiting for the handler.
pub(super) struct Decisions {
    waiting: HashMap<ConnId, Waiting>,
    timeout: Duration,
}

impl Decisions {
    pub(super) fn new(timeout: Duration) -> Decisions {
        Decisions {
            waiting: HashMap::new(),
            timeout,
        }
    }

    /// The `connect` lines of every waiting upgrade, for a handler that has just started.
    pub(super) fn lines(&self) -> Vec<u8> {
        (self.waiting.values())
            .flat_map(|w| w.line.iter().copied())
            .collect()
    }

    pub(super) fn next_deadline(&self) -> Option<Instant> {
        self.waiting.values().map(|w| w.deadline).min()
    }

    fn overdue(&mut self, now: Instant) -> Vec<(ConnId, Upgrade)> {
        let late: Vec<ConnId> = (self.waiting.iter())
            .filter(|(_, w)| w.deadline <= now)
            .map(|(&id, _)| id)
            .collect();
        (late.into_iter())
            .filter_map(|id| Some((id, self.waiting.remove(&id)?.upgrade)))
            .collect()
    }
}

/// What the handler decided.
pub(super) enum Decided {
    Accept {
        user: Option<String>,
        subscribe: Vec<String>,
    },
    Reject {
        status: u16,
        reason: String,
    },
}

impl Loop {
    /// Holds `upgrade` and asks the handler about it.
    pub(super) fn ask_handler(&mut self, id: ConnId, upgrade: Upgrade) {
        let conn = self.named(id);
        let remote = match self.ctx.conn(id) {
            Some(c) => c.remote.to_string(),
            None => return,
        };
        let req = &upgrade.request;
        // A token wsd checked is not shown; one it did not is the handler's to check.
        let full = match upgrade.token {
            Some(_) => super::tokens::redact_token(req.path.clone()),
            None => req.path.clone(),
        };
        let connecting = Connecting {
            conn: conn.to_string(),
            target: &full,
            headers: &req.headers,
            remote,
            user: upgrade.token.as_ref().map(|(u, _)| u.as_str()),
        };
        let line = protocol::line(&connecting.event(true, false));
        if !self.tell_backend(Kind::Connect, id, &line) {
            let decision = Decision::reject(503, "the backend cannot take it");
            return self.settle_upgrade(id, upgrade, decision);
        }
        let deadline = Instant::now() + self.decisions.timeout;
        let waiting = Waiting {
            upgrade,
            line,
            deadline,
        };
        self.decisions.waiting.insert(id, waiting);
    }

    /// The handler's `accept` or `reject` of `id`. `Err` if no upgrade of it waits.
    pub(super) fn handler_decided(&mut self, id: ConnId, decided: Decided) -> Result<(), String> {
        let waiting = self.decisions.waiting.remove(&id);
        let Some(Waiting { upgrade, .. }) = waiting else {
            return Err(format!(
                "no upgrade of connection {id} waits for a decision"
            ));
        };
        match decided {
            Decided::Reject { status, reason } => {
                self.settle_upgrade(id, upgrade, Decision::reject(status, reason));
            }
            Decided::Accept { user, subscribe } => {
                self.settle_upgrade(id, upgrade, Decision::accept());
                if !self.ctx.is_open(id) {
                    return Ok(());
                }
                if let Some(user) = user {
                    self.ctx.bind_user(id, &user);
                }
                for topic in subscribe {
                    self.ctx.subscribe(id, &topic);
                }
            }
        }
        Ok(())
    }

    /// Refuses, with 503, the upgrades the handler did not decide in time.
    pub(super) fn decisions_overdue(&mut self, now: Instant) {
        if self.decisions.next_deadline().is_none_or(|at| at > now) {
            return;
        }
        for (id, upgrade) in self.decisions.overdue(now) {
            log::warn!("the handler did not decide on connection {id} in time; refused with 503");
            let decision = Decision::reject(503, "the handler did not decide in time");
            self.settle_upgrade(id, upgrade, decision);
        }
    }
}
