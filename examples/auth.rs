//! Token authentication at the upgrade, and a chat that names who speaks.
//!
//! A client connects with `?token=...`. `on_upgrade` looks the token up (in a fixed table here;
//! a real server would check a signed token or ask a store) and refuses a missing or unknown
//! one with 401 before the WebSocket opens. The user's name is the connection's state, so every
//! hook can read it by `ConnId`, and each chat message goes to everyone prefixed with it.
//!
//! ```sh
//! cargo run --release --example auth -- start
//! # then, from a browser console:
//! #   ws = new WebSocket("ws://127.0.0.1:2347/?token=ada-secret");
//! #   ws.onmessage = (e) => console.log(e.data);     // ada: hello
//! #   ws.onopen = () => ws.send("hello");
//! ```

use wsd::{Context, Decision, UpgradeRequest, Worker};

/// Who each token belongs to.
const USERS: &[(&str, &str)] = &[
    ("ada-secret", "ada"),
    ("grace-secret", "grace"),
    ("linus-secret", "linus"),
];

/// What each connection keeps: who it is.
pub struct User {
    /// The name its token belongs to.
    pub name: String,
}

/// The app: authenticates each upgrade, then relays every text message to the whole group,
/// prefixed with the sender's name.
pub fn app(worker: &mut Worker) {
    worker.on_upgrade(authenticate);
    worker.on_message(|ctx, conn, msg| {
        // Every open connection has a User: on_upgrade let none in without one.
        let Some(user) = ctx.state::<User>(conn) else {
            return;
        };
        let line = format!("{}: {msg}", user.name);
        ctx.broadcast(line);
    });
}

/// Lets in the owners of known tokens, with their name as the connection's state.
fn authenticate(_ctx: &mut Context, req: &UpgradeRequest<'_>) -> Decision {
    let token = req.query("token");
    let user = token
        .as_deref()
        .and_then(|t| USERS.iter().find(|(known, _)| *known == t));
    match (user, token) {
        (Some((_, name)), _) => Decision::accept().with_state(User {
            name: name.to_string(),
        }),
        (None, None) => refuse("missing token: connect with ?token=..."),
        (None, Some(_)) => refuse("unknown token"),
    }
}

fn refuse(why: &str) -> Decision {
    Decision::reject(401, why).with_header("WWW-Authenticate", "Bearer realm=\"wsd chat\"")
}

#[allow(dead_code)] // The tests run `app` in a program of their own.
fn main() {
    let mut worker = Worker::new("websocket://0.0.0.0:2347");
    worker.name = "auth".into();
    worker.count = 2;
    app(&mut worker);
    wsd::run_all(vec![worker]);
}
