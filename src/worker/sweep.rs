//! The once-a-second sweep over every connection: the deadlines (`handshake_timeout`,
//! `close_timeout`), the keepalive Pings (`ping_interval`) and `idle_timeout`; and the memory a
//! burst left behind (empty send queues' lists, read buffers no message uses).
//!
//! Nothing here reads or writes a socket: connections past their deadline are reaped at once,
//! and the Pings and Closes queued here go out with the loop's next flush.

use super::event_loop::Loop;
use super::moment::{Moment, Reading};
use crate::proto::close;
use std::time::Instant;

impl Loop {
    /// Once a second: drop handshakes and closes that overran their deadlines, ping quiet
    /// clients, and close the ones that stayed silent past `idle_timeout`.
    pub(super) fn sweep(&mut self, now: Instant) {
        let s = &self.settings;
        let (handshake, close) = (s.handshake_timeout, s.close_timeout);
        let (ping, idle) = (s.ping_interval, s.idle_timeout);
        // During a stop that closes clients, an upgrade gets no longer than a closing
        // handshake does (`wsd stop -g` waits for clients however long they take).
        let stopping_late = self
            .stopping
            .closing_since()
            .is_some_and(|t| now.duration_since(t) >= close);
        let (stamp, reading) = (Moment::at(now), Reading::of(now));
        for (idx, c) in self.ctx.conns.iter_mut() {
            c.session.release_if_empty();
            if c.session.close_sent() && c.closing_since.is_none() {
                c.closing_since = Some(stamp);
            }
            let late = match c.closing_since {
                Some(t) => t.elapsed(reading) >= close,
                None => !c.is_open() && (stopping_late || c.since.elapsed(reading) >= handshake),
            };
            if late {
                self.ctx.gone.push((idx, c.id));
                continue;
            }
            if !c.session.can_send() {
                continue;
            }
            let quiet = c.last_input.elapsed(reading);
            if !idle.is_zero() && quiet >= idle {
                log::debug!("connection {} from {}: idle timeout", c.id, c.remote);
                c.session.close(close::GOING_AWAY, "idle timeout");
            } else if !ping.is_zero()
                && quiet >= ping
                && c.pinged_at
                    .is_none_or(|t| t < c.last_input || t.elapsed(reading) >= ping)
            {
                c.session.ping();
                c.pinged_at = Some(stamp);
            } else {
                continue;
            }
            if !c.dirty {
                c.dirty = true;
                self.ctx.dirty.push(idx);
            }
        }
        self.expire_tokens(super::tokens::unix_now());
        self.refresh_records(now);
        self.reap();
        self.inbox.trim();
        self.api_sweep(now);
        self.handler_check();
    }
}
