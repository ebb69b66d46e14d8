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
use super::handler::Told;
use super::upgrade::{Decision, UpgradeRequest};
use crate::proto::close;
use crate::{ConnId, Message};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::time::Instant;

/// A call of a connection hook, with what it is given. Its kind decides what a panic in it
/// costs.
pub(super) enum Hook<'a> {
    Connect,
    Message(Message),
    Close,
    Error(&'a ConnError),
    BufferFull,
    BufferDrain,
}

impl Hook<'_> {
    fn name(&self) -> &'static str {
        match self {
            Hook::Connect => "on_connect",
            Hook::Message(_) => "on_message",
            Hook::Close => "on_close",
            Hook::Error(_) => "on_error",
            Hook::BufferFull => "on_buffer_full",
            Hook::BufferDrain => "on_buffer_drain",
        }
    }
}

/// What a panic in a connection hook costs, by the hook's kind.
enum OnPanic {
    /// Close the connection with 1011 and tell `on_error`.
    FailAndTell,
    /// Close it, but do not tell `on_error` of its own panic: that would call it again.
    Fail,
    /// Nothing: after `on_close` the connection is gone.
    Nothing,
}

/// A hook about the worker itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WorkerHook {
    Start,
    Stop,
}

impl Loop {
    /// Calls the app's connection hook, if it set one; a panic is logged and fails that
    /// connection only.
    pub(super) fn call_hook(&mut self, id: ConnId, hook: Hook<'_>) {
        if self.handler.is_some() || self.webhook.is_some() {
            match &hook {
                Hook::Message(m) => self.handler_tell(id, Told::Message(m)),
                Hook::Close => self.handler_tell(id, Told::Close),
                _ => {}
            }
        }
        let name = hook.name();
        let on_panic = match hook {
            Hook::Close => OnPanic::Nothing,
            Hook::Error(_) => OnPanic::Fail,
            _ => OnPanic::FailAndTell,
        };
        let (h, ctx) = (&mut self.hooks, &mut self.ctx);
        let set = match hook {
            Hook::Message(_) => h.on_message.is_some(),
            Hook::Error(_) => h.on_error.is_some(),
            Hook::Connect => h.on_connect.is_some(),
            Hook::Close => h.on_close.is_some(),
            Hook::BufferFull => h.on_buffer_full.is_some(),
            Hook::BufferDrain => h.on_buffer_drain.is_some(),
        };
        if !set {
            // Nothing to time or to guard (an exec handler's app sets none).
            return;
        }
        let call = || match hook {
            Hook::Message(msg) => h.on_message.as_mut().map(|f| f(ctx, id, msg)),
            Hook::Error(err) => h.on_error.as_mut().map(|f| f(ctx, id, err)),
            Hook::Connect => h.on_connect.as_mut().map(|f| f(ctx, id)),
            Hook::Close => h.on_close.as_mut().map(|f| f(ctx, id)),
            Hook::BufferFull => h.on_buffer_full.as_mut().map(|f| f(ctx, id)),
            Hook::BufferDrain => h.on_buffer_drain.as_mut().map(|f| f(ctx, id)),
        };
        let started = Instant::now();
        if catch_unwind(AssertUnwindSafe(call)).is_ok() {
            let hooks = &mut self.ctx.counters.hook_seconds;
            hooks.observe(&crate::metrics::HOOK_BOUNDS, started.elapsed());
            return;
        }
        log::error!("{name} hook panicked on connection {id}; closing it with 1011");
        let err = ConnError::HookPanicked;
        match on_panic {
            OnPanic::FailAndTell => {
                if self.fail(id, &err) {
                    self.call_hook(id, Hook::Error(&err));
                }
            }
            OnPanic::Fail => {
                self.fail(id, &err);
            }
            OnPanic::Nothing => {}
        }
    }

    /// A hook panicked on `id`: close it with 1011. False if it was gone already.
    pub(super) fn fail(&mut self, id: ConnId, err: &ConnError) -> bool {
        let Some(idx) = self.ctx.index_of(id) else {
            return false;
        };
        let conn = &mut self.ctx.conns[idx];
        log::debug!("connection {id} from {}: {err}", conn.remote);
        conn.session.fail(close::INTERNAL_ERROR, "internal error");
        self.ctx.mark_dirty(idx);
        true
    }

    /// Asks `on_upgrade` about `request`: a plain accept when the app set no hook, and a 500
    /// refusal, logged, when it panics.
    pub(super) fn call_upgrade_hook(&mut self, request: &UpgradeRequest<'_>) -> Decision {
        let Some(f) = self.hooks.on_upgrade.as_mut() else {
            return Decision::accept();
        };
        let ctx = &mut self.ctx;
        match catch_unwind(AssertUnwindSafe(|| f(ctx, request))) {
            Ok(decision) => decision,
            Err(_) => {
                log::error!(
                    "on_upgrade hook panicked on the upgrade from {}; refusing it with 500",
                    request.remote_addr()
                );
                Decision::reject(500, "internal error")
            }
        }
    }

    /// Drops what a connection that is gone carried (the app's state), once `on_close` has
    /// run. A panic in the state's `Drop` is logged, and the worker carries on.
    pub(super) fn forget_leaving(&mut self) {
        let Some(leaving) = self.ctx.leaving.take() else {
            return;
        };
        let id = leaving.id;
        if catch_unwind(AssertUnwindSafe(|| drop(leaving))).is_err() {
            log::error!("dropping the state of connection {id} panicked; the worker carries on");
        }
    }

    /// Tells the app about send queues that filled up during the hooks that just ran.
    pub(super) fn deliver_notices(&mut self) {
        while !self.ctx.notices.is_empty() {
            for notice in std::mem::take(&mut self.ctx.notices) {
                let BufferNotice::Full(id) = notice;
                if self.ctx.buffered_amount(id).is_some() {
                    self.call_hook(id, Hook::BufferFull);
                }
            }
        }
    }

    /// Calls `on_worker_start` or `on_worker_stop`; a panic is logged and the worker carries on.
    pub(super) fn call_worker_hook(&mut self, kind: WorkerHook) {
        let (f, name) = match kind {
            WorkerHook::Start => (self.hooks.on_worker_start.as_mut(), "on_worker_start"),
            WorkerHook::Stop => (self.hooks.on_worker_stop.as_mut(), "on_worker_stop"),
        };
        let Some(f) = f else {
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
