//! `pubsub`: topics over a small JSON protocol, on the bus's topics.
//!
//! | client sends | server answers |
//! |---|---|
//! | `{"subscribe":"room"}` | `{"subscribed":"room"}` |
//! | `{"unsubscribe":"room"}` | `{"unsubscribed":"room"}` |
//! | `{"publish":"room","data":X}` | every subscriber of `room`, on any worker or server, gets `{"topic":"room","data":X}` |
//! | `{"presence":"room"}` | `{"presence":"room","topic":"room","scope":"cluster","count":N,"users":[...],"subscribers":[{"conn","user","info"}]}`, for a subscriber of a topic that keeps presence |
//! | anything else | `{"error":"why"}`; the connection stays open |
//!
//! In a group with `auth = "jwt"`, a subscription the client's token does not allow (its
//! `topics` claim, or a private `$` topic it does not name) is refused with
//! `{"error":"not allowed to subscribe to \"...\""}`.
//!
//! A connection holds at most [`MAX_TOPICS`] topics and a topic name is at most
//! [`MAX_TOPIC_LEN`] bytes, so one client cannot grow a worker's memory without bound.

use crate::{ConnId, Context, Message, Worker};
use serde::Deserialize;
use serde_json::{Value, json};

/// Topics one connection may be subscribed to at once.
pub const MAX_TOPICS: usize = 100;
/// Longest topic name, in bytes.
pub const MAX_TOPIC_LEN: usize = 256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Command {
    subscribe: Option<String>,
    unsubscribe: Option<String>,
    publish: Option<String>,
    presence: Option<String>,
    data: Option<Value>,
}

/// Installs the topic protocol on `worker`.
pub fn pubsub(worker: &mut Worker) {
    // Nothing of its own per connection: a reload moves its clients as they are.
    worker.on_handoff(|_, _| Vec::new());
    worker.on_message(|ctx, conn, msg| {
        if let Err(why) = handle(ctx, conn, &msg) {
            let _ = ctx.send(conn, json!({ "error": why.to_string() }).to_string());
        }
    });
}

/// Why a client's command was refused; the client gets `{"error": "<this>"}`.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error(
        "expected {{\"subscribe\"|\"unsubscribe\"|\"publish\"|\"presence\": TOPIC, \"data\": ...}}: {0}"
    )]
    NotACommand(serde_json::Error),
    #[error("a topic is at most {MAX_TOPIC_LEN} bytes")]
    TopicTooLong,
    #[error("not allowed to subscribe to {0:?}")]
    NotAllowed(String),
    #[error("at most {MAX_TOPICS} topics per connection")]
    TooManyTopics,
    #[error("publish needs \"data\"")]
    NoData,
    #[error("no presence for {0:?}: subscribe to it first, in a group with presence for it")]
    NoPresence(String),
    #[error("one of subscribe, unsubscribe, publish or presence, please")]
    Ambiguous,
}

fn handle(ctx: &mut Context, conn: ConnId, msg: &Message) -> Result<(), Refusal> {
    let cmd: Command = serde_json::from_slice(msg.as_bytes()).map_err(Refusal::NotACommand)?;
    let named = [
        &cmd.subscribe,
        &cmd.unsubscribe,
        &cmd.publish,
        &cmd.presence,
    ];
    if named
        .iter()
        .any(|t| t.as_ref().is_some_and(|t| t.len() > MAX_TOPIC_LEN))
    {
        return Err(Refusal::TopicTooLong);
    }
    match cmd {
        Command {
            presence: Some(topic),
            subscribe: None,
            unsubscribe: None,
            publish: None,
            data: None,
        } => {
            // The answer comes once the other workers (or Redis) have said.
            if !ctx.ask_presence(conn, &topic) {
                return Err(Refusal::NoPresence(topic));
            }
        }
        Command {
            subscribe: Some(topic),
            unsubscribe: None,
            publish: None,
            presence: None,
            data: None,
        } => {
            if !ctx.may_subscribe(conn, &topic) {
                return Err(Refusal::NotAllowed(topic));
            }
            let held = ctx.topics_of(conn);
            if held.len() >= MAX_TOPICS && !held.contains(&topic) {
                return Err(Refusal::TooManyTopics);
            }
            // The answer before the subscription, so it comes before the client's own join
            // event (with presence_events).
            reply(ctx, conn, json!({ "subscribed": topic }));
            ctx.subscribe(conn, &topic);
        }
        Command {
            subscribe: None,
            unsubscribe: Some(topic),
            publish: None,
            presence: None,
            data: None,
        } => {
            ctx.unsubscribe(conn, &topic);
            reply(ctx, conn, json!({ "unsubscribed": topic }));
        }
        Command {
            subscribe: None,
            unsubscribe: None,
            publish: Some(topic),
            presence: None,
            data: Some(data),
        } => {
            // Written by hand so `topic` comes first, as documented (serde_json sorts keys).
            let delivery = format!(
                "{{\"topic\":{},\"data\":{data}}}",
                Value::from(topic.as_str())
            );
            ctx.publish(&topic, delivery);
        }
        Command {
            publish: Some(_),
            data: None,
            ..
        } => return Err(Refusal::NoData),
        _ => return Err(Refusal::Ambiguous),
    }
    Ok(())
}

fn reply(ctx: &mut Context, conn: ConnId, v: Value) {
    let _ = ctx.send(conn, v.to_string());
}
