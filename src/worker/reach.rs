//! What a hook can reach beyond its own worker: every client of the group, one client
//! anywhere by its [`GlobalId`], topic subscribers everywhere, and the other workers
//! themselves. Everything here goes over the bus (`crate::bus`); the local part of each call
//! is done at once, the rest by the workers that receive it.

use super::context::Context;
use super::errors::SendError;
use crate::bus::GlobalId;
use crate::bus::wire::{BusMessage, Origin};
use crate::{ConnId, Message};
use bytes::Bytes;

/// A worker on the bus: the host (wsd master) and the slot in the group.
pub type WorkerAddr = Origin;

impl Context {
    /// The id that names `conn` on the whole bus (`send_to` takes it from any worker).
    pub fn global_id(&self, conn: ConnId) -> Option<GlobalId> {
        self.is_open(conn).then_some(GlobalId {
            host: self.bus.origin.host,
            slot: self.bus.origin.slot,
            conn,
        })
    }

    /// Sends `msg` to a client held by any worker of the group. Here it is a plain `send`;
    /// elsewhere it goes over the bus, and a client that has gone meanwhile is skipped there.
    pub fn send_to(&mut self, to: GlobalId, msg: impl Into<Message>) -> Result<(), SendError> {
        let origin = self.bus.origin;
        if to.host == origin.host && to.slot == origin.slot {
            return self.send(to.conn, msg);
        }
        let msg = BusMessage::SendTo(to.conn, msg.into());
        if to.host == origin.host {
            self.bus.send_to_slot(to.slot as usize, &msg);
        } else {
            self.bus.send_to_host(to.host, to.slot, &msg);
        }
        Ok(())
    }

    /// Sends `msg` to every open connection of every worker of the group (and of the same
    /// group on every server of the cluster). Returns how many of this worker's clients got it.
    pub fn broadcast(&mut self, msg: impl Into<Message>) -> usize {
        self.send_group(BusMessage::Broadcast(msg.into()))
    }

    /// Sends a broadcast, a publish or a user's message to the other workers and carries out
    /// this worker's part. A worker that still awaits its turn on the bus ends it took over
    /// holds the message until the turn comes ([`crate::bus::Bus::hold`]), and counts 0.
    fn send_group(&mut self, msg: BusMessage) -> usize {
        let Some(msg) = self.bus.hold(msg) else {
            return 0;
        };
        self.bus.send_to_group(&msg);
        self.bus.forward(&msg);
        self.deliver_local(msg)
    }

    /// This worker's part of a message for clients: its clients, a topic's subscribers, a
    /// user's connections, or the one connection of a `send_to` (skipped if it has gone).
    /// Returns how many got it.
    pub(crate) fn deliver_local(&mut self, msg: BusMessage) -> usize {
        match msg {
            BusMessage::Broadcast(m) => self.broadcast_local(m),
            BusMessage::Publish(topic, m) => self.publish_local(&topic, m),
            BusMessage::SendUser(uid, m) => self.send_to_user_local(&uid, m),
            BusMessage::SendTo(conn, m) => usize::from(self.send(conn, m).is_ok()),
            BusMessage::App(_)
            | BusMessage::Ask(..)
            | BusMessage::Answer(..)
            | BusMessage::Mark(_) => 0,
        }
    }

    /// A message from another host, as [`Context::deliver_local`] delivers it, but not to
    /// the clients a crossing still keeps it from (`bus::crossing`).
    pub(crate) fn deliver_remote(&mut self, msg: BusMessage) {
        if !self.bus.crossings().is_taking() {
            self.deliver_local(msg);
            return;
        }
        let Some((ids, m)) = self.recipients(&msg) else {
            return;
        };
        let crossings = self.bus.crossings();
        let ids = (ids.into_iter())
            .filter(|&id| !crossings.withholds(id, &msg))
            .collect();
        self.send_many(ids, m);
    }

    /// A copy, from the giver on handoff line `line`, of a message from another host: to
    /// the clients that came on that line and are owed it (`bus::crossing`).
    pub(crate) fn deliver_copy(&mut self, line: usize, msg: BusMessage) {
        let Some((ids, m)) = self.recipients(&msg) else {
            return;
        };
        let crossings = self.bus.crossings();
        let ids = (ids.into_iter())
            .filter(|&id| crossings.copy_for(line, id, &msg))
            .collect();
        self.send_many(ids, m);
    }

    /// Delivers a message for clients (a broadcast, a publish, a user's, a `send_to`) to
    /// those of `only` it is for.
    pub(crate) fn deliver_only(
        &mut self,
        msg: BusMessage,
        only: &std::collections::HashSet<ConnId>,
    ) {
        let Some((ids, m)) = self.recipients(&msg) else {
            return;
        };
        let ids = ids.into_iter().filter(|id| only.contains(id)).collect();
        self.send_many(ids, m);
    }

    /// The clients here a message is for, and what they get; `None` if it is not for clients.
    fn recipients(&self, msg: &BusMessage) -> Option<(Vec<ConnId>, Message)> {
        Some(match msg {
            BusMessage::Broadcast(m) => (self.connections(), m.clone()),
            BusMessage::Publish(topic, m) => (self.topics.members(topic), m.clone()),
            BusMessage::SendUser(uid, m) => (self.users.members(uid), m.clone()),
            BusMessage::SendTo(conn, m) => (vec![*conn], m.clone()),
            BusMessage::App(_)
            | BusMessage::Ask(..)
            | BusMessage::Answer(..)
            | BusMessage::Mark(_) => return None,
        })
    }

    /// The bus ends taken over from the slot's previous worker are this worker's to read
    /// from now on: the group messages held meanwhile go out. False if it was not waiting.
    pub(crate) fn take_bus_turn(&mut self) -> bool {
        let Some(held) = self.bus.take_turn() else {
            return false;
        };
        self.release_group(held);
        true
    }

    /// Sends group messages that were held (here, or by a worker that handed its clients
    /// here); while this worker still holds, they stay held.
    pub(crate) fn release_group(&mut self, messages: Vec<BusMessage>) {
        for msg in messages {
            self.send_group(msg);
        }
    }

    /// The group's hold ends (`ToWorker::Resume`): from now on messages go to the slots
    /// below `view`, those held first.
    pub(crate) fn resume_group(&mut self, view: usize) {
        let held = self.bus.resume(view);
        self.release_group(held);
    }

    /// Subscribes `conn` to `topic`; false if it already was, is not an open connection, or
    /// may not (its token does not allow the topic: [`Context::may_subscribe`]).
    pub fn subscribe(&mut self, conn: ConnId, topic: &str) -> bool {
        let added = self.is_open(conn)
            && self.may_subscribe(conn, topic)
            && self.topics.subscribe(conn, topic);
        if added && self.topics.count(topic) == 1 {
            self.bus.interest(topic, true);
        }
        if added {
            self.presence_join(conn, topic, true);
        }
        added
    }

    /// Unsubscribes `conn` from `topic`; false if it was not subscribed.
    pub fn unsubscribe(&mut self, conn: ConnId, topic: &str) -> bool {
        let removed = self.topics.unsubscribe(conn, topic);
        if removed && self.topics.count(topic) == 0 {
            self.bus.interest(topic, false);
        }
        if removed {
            self.presence_leave(conn, topic);
        }
        removed
    }

    /// A connection goes to another worker. The next worker of this slot keeps its bus id,
    /// so nothing is announced and its records stay (that worker writes the same ones); in a
    /// worker of another slot its bus id changes, so it leaves here as if it had gone.
    pub(crate) fn hand_over_conn(&mut self, conn: ConnId, same_slot: bool) {
        if !same_slot {
            return self.forget_conn(conn);
        }
        for topic in self.topics.forget(conn) {
            self.bus.interest(&topic, false);
        }
        self.users.forget(conn);
    }

    /// A connection handed over by another worker takes up its user and topics: quietly from
    /// the slot's previous worker ([`Context::hand_over_conn`]), as a newcomer from another
    /// slot's. What its token allows was checked when it subscribed.
    pub(crate) fn take_over_conn(
        &mut self,
        conn: ConnId,
        user: Option<&str>,
        topics: &[String],
        same_slot: bool,
    ) {
        if let Some(uid) = user
            && self.users.subscribe(conn, uid)
        {
            self.record_user(conn, uid, true);
        }
        for topic in topics {
            if !self.topics.subscribe(conn, topic) {
                continue;
            }
            if self.topics.count(topic) == 1 {
                self.bus.interest(topic, true);
            }
            self.presence_join(conn, topic, !same_slot);
        }
    }

    /// Drops the subscriptions and the user of a connection that has gone (while what it
    /// carried is still readable: presence shows its user and info in the leave).
    pub(crate) fn forget_conn(&mut self, conn: ConnId) {
        if self.presence.topics != crate::config::Presence::Off {
            for topic in self.topics.of(conn).to_vec() {
                self.presence_leave(conn, &topic);
            }
        }
        for topic in self.topics.forget(conn) {
            self.bus.interest(&topic, false);
        }
        if self.bus.has_cluster()
            && let Some(user) = self.user_of(conn).map(str::to_string)
        {
            self.record_user(conn, &user, false);
        }
        self.users.forget(conn);
    }

    /// The topics `conn` is subscribed to.
    pub fn topics_of(&self, conn: ConnId) -> Vec<String> {
        self.topics.of(conn).to_vec()
    }

    /// Sends `msg` to every subscriber of `topic` on every worker (and server). Returns how
    /// many of this worker's subscribers got it.
    pub fn publish(&mut self, topic: &str, msg: impl Into<Message>) -> usize {
        self.send_group(BusMessage::Publish(topic.to_string(), msg.into()))
    }

    /// Binds `conn` to the user `uid` (a connection authenticated by a token is bound to its
    /// `sub` already), replacing the user it had. False if `conn` is not open.
    pub fn bind_user(&mut self, conn: ConnId, uid: &str) -> bool {
        if !self.is_open(conn) {
            return false;
        }
        if let Some(old) = self.users.of(conn).first().cloned() {
            self.users.unsubscribe(conn, &old);
            self.record_user(conn, &old, false);
        }
        let bound = self.users.subscribe(conn, uid);
        if bound {
            self.record_user(conn, uid, true);
        }
        bound
    }

    /// The user `conn` is bound to.
    pub fn user_of(&self, conn: ConnId) -> Option<&str> {
        self.users.of(conn).first().map(String::as_str)
    }

    /// Asks where user `uid` is connected: on every worker of the host, and with `[server]
    /// bus` on every host (from the records in Redis). `then` runs, in this worker, with the
    /// connections' ids once the answers are in (within 2 seconds, with what came).
    ///
    /// ```no_run
    /// # let mut worker = wsd::Worker::new("websocket://0.0.0.0:2346");
    /// worker.on_message(|ctx, conn, msg| {
    ///     let who = msg.to_string();
    ///     ctx.user_connections(&who.clone(), move |ctx, ids| {
    ///         let _ = ctx.send(conn, format!("{who}: {} connection(s)", ids.len()));
    ///     });
    /// });
    /// ```
    pub fn user_connections(
        &mut self,
        uid: &str,
        then: impl FnOnce(&mut Context, Vec<GlobalId>) + 'static,
    ) {
        let then: super::gather::Then = Box::new(move |ctx, answer| {
            let ids = answer["connections"].as_array().map_or(Vec::new(), |a| {
                a.iter()
                    .filter_map(|id| id.as_str()?.parse().ok())
                    .collect()
            });
            then(ctx, ids)
        });
        self.asks.push(super::gather::Pending {
            what: super::gather::Wanted::User(uid.to_string()),
            reply_to: super::gather::ReplyTo::Hook(then),
        });
    }

    /// Asks whether user `uid` has a connection anywhere (see [`Context::user_connections`]);
    /// `then` runs with the answer.
    pub fn is_online(&mut self, uid: &str, then: impl FnOnce(&mut Context, bool) + 'static) {
        self.user_connections(uid, move |ctx, ids| then(ctx, !ids.is_empty()));
    }

    /// This worker's connections of user `uid`.
    pub fn user_connections_local(&self, uid: &str) -> Vec<ConnId> {
        self.users.members(uid)
    }

    /// Sends `msg` to every connection of user `uid`, on every worker (and server: GatewayWorker's
    /// `sendToUid`). Returns how many of this worker's connections got it.
    pub fn send_to_user(&mut self, uid: &str, msg: impl Into<Message>) -> usize {
        self.send_group(BusMessage::SendUser(uid.to_string(), msg.into()))
    }

    /// Delivers a message for user `uid` to this worker's connections of that user.
    pub(crate) fn send_to_user_local(&mut self, uid: &str, msg: Message) -> usize {
        let members = self.users.members(uid);
        self.send_many(members, msg)
    }

    /// Hands `data` to the `on_bus_message` hook of the worker in `slot` on this server.
    pub fn bus_send(&mut self, slot: usize, data: impl Into<Bytes>) {
        self.bus.send_to_slot(slot, &BusMessage::App(data.into()));
    }

    /// Hands `data` to the `on_bus_message` hook of every other worker of the group on this
    /// server (a cluster bus does not carry app messages to other servers).
    pub fn bus_send_all(&mut self, data: impl Into<Bytes>) {
        self.bus.send_to_peers(&BusMessage::App(data.into()));
    }

    /// This worker's address on the bus.
    pub fn bus_addr(&self) -> WorkerAddr {
        self.bus.origin
    }

    /// Delivers a published message to this worker's subscribers, encoding the frame once.
    pub(crate) fn publish_local(&mut self, topic: &str, msg: Message) -> usize {
        let members = self.topics.members(topic);
        self.send_many(members, msg)
    }
}
