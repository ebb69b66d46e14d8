//! How the loop calls into the application: every hook and timer callback runs under
//! `catch_unwind`, so a panic costs at most the connection it was about (closed with 1011,
//! `on_error` told), never the worker and its other clients. The `on_buffer_full` notices that
//! sends raise while hooks run are delivered here too, after the turn's timers.
//!
//! Which hook runs when is the data path's business (`event_loop.rs`); this file is the
//! calling convention they all share.

use super::context::BufferNotice;
use super::errors::ConnError;
use super::event_loop::Loop;
use super::{ConnHook, Context, Hooks, WorkerHook};
use crate::ConnId;
use crate::proto::close;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

impl Loop {
    /// Calls a connection hook; a panic is logged and fails that connection only.
    pub(super) fn call_conn_hook(
        &mut self,
        id: ConnId,
        name: &str,
        f: impl FnOnce(&mut Hooks, &mut Context),
    ) {
        let (hooks, ctx) = (&mut self.hooks, &mut self.ctx);
        if catch_unwind(AssertUnwindSafe(|| f(hooks, ctx))).is_err() {
            log::error!("{name} hook panicked on connection {id}; closing it with 1011");
            let err = ConnError::HookPanicked;
            // After `on_close` the connection is gone. `on_error` is not told of its own
            // panic: that would call it again, and again.
            if name != "on_close" && self.fail(id, &err) && name != "on_error" {
                self.call_error_hook(id, &err);
            }
        }
    }

    /// A hook panicked on `id`: close it with 1011. False if it was gone already.
    fn fail(&mut self, id: ConnId, err: &ConnError) -> bool {
        let idx = id.idx as usize;
        let Some(conn) = self
            .ctx
            .conns
            .get_mut(idx)
            .filter(|c| c.serial == id.serial)
        else {
            return false;
        };
        log::debug!("connection {id} from {}: {err}", conn.remote);
        conn.session.fail(close::INTERNAL_ERROR, "internal error");
        self.ctx.mark_dirty(idx);
        true
    }

    /// Calls a hook that takes only the connection (`on_connect`, `on_close`,
    /// `on_buffer_full`, `on_buffer_drain`), if the app set it.
    pub(super) fn call_plain_hook(
        &mut self,
        id: ConnId,
        name: &str,
        pick: impl FnOnce(&mut Hooks) -> Option<&mut ConnHook>,
    ) {
        self.call_conn_hook(id, name, |h, ctx| {
            if let Some(f) = pick(h) {
                f(ctx, id)
            }
        });
    }

    pub(super) fn call_error_hook(&mut self, id: ConnId, err: &ConnError) {
        self.call_conn_hook(id, "on_error", |h, ctx| {
            if let Some(f) = h.on_error.as_mut() {
                f(ctx, id, err)
            }
        });
    }

    /// Tells the app about send queues that filled up during the hooks that just ran.
    pub(super) fn deliver_notices(&mut self) {
        while !self.ctx.notices.is_empty() {
            for notice in std::mem::take(&mut self.ctx.notices) {
                let BufferNotice::Full(id) = notice;
                if self.ctx.buffered_amount(id).is_some() {
                    self.call_plain_hook(id, "on_buffer_full", |h| h.on_buffer_full.as_mut());
                }
            }
        }
    }

    /// Calls `on_worker_start` or `on_worker_stop`; a panic is logged and the worker carries on.
    pub(super) fn call_worker_hook(
        &mut self,
        name: &str,
        pick: impl FnOnce(&mut Hooks) -> Option<&mut WorkerHook>,
    ) {
        let Some(f) = pick(&mut self.hooks) else {
            return;
        };
        let ctx = &mut self.ctx;
        if catch_unwind(AssertUnwindSafe(|| f(ctx))).is_err() {
            log::error!("{name} hook panicked; the worker carries on");
        }
    }

    /// Runs the timers that are due; a callback that panics is logged and otherwise treated as
    /// one that returned (a repeating timer is re-armed).
    pub(super) fn run_timers(&mut self) {
        let now = Instant::now();
        while let Some((id, due, mut callback)) = self.ctx.timers.pop_due(now) {
            let ctx = &mut self.ctx;
            if catch_unwind(AssertUnwindSafe(|| callback(ctx))).is_err() {
                log::error!("timer {id:?} panicked; the worker carries on");
            }
            self.ctx.timers.finish(id, due, callback, now);
        }
    }
}
