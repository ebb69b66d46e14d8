//! Signed tokens (`auth = "jwt"`) against a real master: how a token is presented, every way
//! it is refused (401 before the upgrade), what it allows (topics, private `$` topics), its
//! expiry during a connection and its renewal, and its user reached through the API on every
//! worker.

mod common;

use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use serde_json::{Value, json};
use tungstenite::Message;

const SECRET: &str = "tokens-test-secret-0123456789abcdef";
const KEY: &str = "tokens-api-key-0123456789";
const WORKERS: usize = 2;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

fn ada(ttl: u64) -> String {
    token(json!({"sub": "ada", "exp": now() + ttl}))
}

/// A pubsub group with HS256 tokens, the cookie `wsd_token`, and the API.
fn start() -> (Server, u16) {
    let extra = format!(
        "auth = \"jwt\"\njwt_hs256_secret = \"{SECRET}\"\ntoken_cookie = \"wsd_token\"\n\
         \n[api]\nlisten = \"127.0.0.1:0\"\nkeys = [\"{KEY}\"]\n"
    );
    let mut server = Server::start_extra("pubsub", WORKERS, &extra);
    let st = server.status();
    let api = st["api"]["listen"].as_str().unwrap();
    let port = api.rsplit(':').next().unwrap().parse().unwrap();
    (server, port)
}

fn connect(server: &Server, token: &str) -> Client {
    Client::connect_with(server.port, &format!("/?token={token}"), &[])
        .expect("a valid token upgrades")
        .0
}

/// The answer to an upgrade request with `target` and `headers`, from raw HTTP.
fn refused(server: &Server, target: &str, headers: &str) -> HttpAnswer {
    let req = upgrade_request_to(target, headers);
    http_exchange(server.port, req.as_bytes(), DEADLINE)
}

fn subscribe(c: &mut Client, topic: &str) -> Value {
    c.send_text(&json!({ "subscribe": topic }).to_string());
    serde_json::from_str(&c.recv_text()).unwrap()
}

fn api(port: u16, path: &str, body: &Value) -> Value {
    let a = api_call(port, "POST", path, Some(KEY), &body.to_string());
    assert_eq!(a.status, 200, "{a:?}");
    serde_json::from_str(&a.body).unwrap()
}

#[test]
fn a_token_is_taken_from_the_query_a_header_or_the_cookie() {
    let (server, _) = start();
    let secret_token = ada(60);
    let mut q = connect(&server, &secret_token);
    assert_eq!(subscribe(&mut q, "room"), json!({"subscribed": "room"}));
    // Operators see the path without the credential.
    let rows = wait_for("the connection listed", DEADLINE, || {
        let out = server.wsd(&["connections"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.contains("token=***").then_some(text)
    });
    assert!(!rows.contains(&secret_token), "{rows}");
    let bearer = format!("Bearer {}", ada(60));
    let (mut h, _) = Client::connect_with(server.port, "/", &[("authorization", &bearer)]).unwrap();
    assert_eq!(subscribe(&mut h, "room"), json!({"subscribed": "room"}));
    let cookie = format!("theme=dark; wsd_token={}", ada(60));
    let (mut c, _) = Client::connect_with(server.port, "/", &[("cookie", &cookie)]).unwrap();
    assert_eq!(subscribe(&mut c, "room"), json!({"subscribed": "room"}));
}

#[test]
fn bad_tokens_get_401_before_the_upgrade() {
    let (server, _) = start();
    let other_key = encode(
        &Header::default(),
        &json!({"sub": "ada", "exp": now() + 60}),
        &EncodingKey::from_secret(b"some-other-secret-0123456789abcdef"),
    )
    .unwrap();
    let b64 = |s: &str| {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s)
    };
    let none = format!(
        "{}.{}.",
        b64(r#"{"alg":"none","typ":"JWT"}"#),
        b64(&json!({"sub": "ada", "exp": now() + 60}).to_string())
    );
    let hs512 = encode(
        &Header::new(Algorithm::HS512),
        &json!({"sub": "ada", "exp": now() + 60}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let cases = [
        ("/".to_string(), "no token"),
        ("/?token=not.a.jwt".to_string(), "malformed token"),
        (format!("/?token={}", ada(0)), "token expired"),
        (
            format!("/?token={}", token(json!({"sub": "ada", "exp": now() - 5}))),
            "token expired",
        ),
        (format!("/?token={other_key}"), "signature does not verify"),
        (format!("/?token={none}"), ""),
        (format!("/?token={hs512}"), "algorithm not accepted"),
        (
            format!("/?token={}", token(json!({"exp": now() + 60}))),
            "lacks the \"sub\" claim",
        ),
    ];
    for (target, why) in cases {
        let a = refused(&server, &target, "");
        assert_eq!(a.status, 401, "{target}: {a:?}");
        assert!(a.body.contains(why), "{target}: {a:?}");
        assert_eq!(a.header("www-authenticate"), Some("Bearer"), "{a:?}");
    }
    // A refused client cost nothing: a good one still connects and is served.
    let mut c = connect(&server, &ada(60));
    assert_eq!(subscribe(&mut c, "room"), json!({"subscribed": "room"}));
}

#[test]
fn topics_claims_and_private_topics_limit_subscriptions() {
    let (server, port) = start();
    let limited = token(json!({
        "sub": "bob", "exp": now() + 60,
        "topics": ["room/*", "$user/bob"], "info": {"name": "Bob"}
    }));
    let mut bob = connect(&server, &limited);
    assert_eq!(
        subscribe(&mut bob, "room/1"),
        json!({"subscribed": "room/1"})
    );
    assert_eq!(
        subscribe(&mut bob, "$user/bob"),
        json!({"subscribed": "$user/bob"})
    );
    for topic in ["news", "$user/ada"] {
        let answer = subscribe(&mut bob, topic);
        assert_eq!(
            answer["error"],
            format!("not allowed to subscribe to {topic:?}"),
            "{answer}"
        );
    }
    // Without a topics claim: any topic but a private one.
    let mut ada = connect(&server, &ada(60));
    assert_eq!(subscribe(&mut ada, "news"), json!({"subscribed": "news"}));
    assert!(subscribe(&mut ada, "$user/ada")["error"].is_string());
    // Presence shows the user and the token's info.
    let req = format!(
        "GET /api/presence?topic=room/1 HTTP/1.1\r\nAuthorization: Bearer {KEY}\r\n\
         Connection: close\r\n\r\n"
    );
    let a = http_exchange(port, req.as_bytes(), DEADLINE);
    let p: Value = serde_json::from_str(&a.body).unwrap();
    assert_eq!(p["users"], json!(["bob"]), "{p}");
    assert_eq!(p["subscribers"][0]["info"], json!({"name": "Bob"}), "{p}");
}

#[test]
fn an_expiring_token_closes_its_connection_unless_renewed() {
    let (server, _) = start();
    let short = ada(2);
    let mut renewed = connect(&server, &short);
    let mut left = connect(&server, &short);
    renewed.send_text(&json!({ "token": ada(120) }).to_string());
    let answer: Value = serde_json::from_str(&renewed.recv_text()).unwrap();
    assert_eq!(answer["refreshed"], true, "{answer}");
    // A renewal for another user, or with a bad token, is refused and changes nothing.
    let bob = token(json!({"sub": "bob", "exp": now() + 120}));
    left.send_text(&json!({ "token": bob }).to_string());
    let answer: Value = serde_json::from_str(&left.recv_text()).unwrap();
    assert_eq!(answer["refreshed"], false, "{answer}");
    assert_eq!(answer["error"], "token is for another user");

    // The one not renewed is closed with 3000 at expiry; the renewed one is still served.
    let code = left.expect_close();
    assert_eq!(code, 3000);
    assert_eq!(
        subscribe(&mut renewed, "room"),
        json!({"subscribed": "room"})
    );
}

#[test]
fn a_user_is_reached_on_every_worker_through_the_api() {
    let (server, port) = start();
    // Enough of ada's connections that both workers hold some.
    let mut adas: Vec<Client> = (0..8).map(|_| connect(&server, &ada(60))).collect();
    let mut bob = connect(&server, &token(json!({"sub": "bob", "exp": now() + 60})));
    for c in adas.iter_mut().chain([&mut bob]) {
        subscribe(c, "sync");
    }
    let answer = api(
        port,
        "/api/send",
        &json!({"user": "ada", "data": "for ada"}),
    );
    assert_eq!(answer, json!({"delivered": 8}));
    for c in &mut adas {
        assert_eq!(c.recv_text(), "for ada");
    }
    let answer = api(
        port,
        "/api/send",
        &json!({"user": "bob", "data": {"b64": "Ym9i"}}),
    );
    assert_eq!(answer, json!({"delivered": 1}));
    assert_eq!(bob.recv(), Message::binary(b"bob".to_vec()));

    let answer = api(
        port,
        "/api/disconnect",
        &json!({"user": "ada", "code": 4003, "reason": "banned"}),
    );
    assert_eq!(answer, json!({"disconnected": 8}));
    for c in &mut adas {
        assert_eq!(c.expect_close(), 4003);
    }
    assert_eq!(subscribe(&mut bob, "still"), json!({"subscribed": "still"}));
}

#[test]
fn es256_tokens_verify_with_a_public_key_file() {
    let key = rcgen::KeyPair::generate().unwrap();
    let (dir, config) = Server::config(
        "pubsub",
        1,
        "auth = \"jwt\"\njwt_public_key = \"jwt.pem\"\n",
    );
    std::fs::write(dir.path().join("jwt.pem"), key.public_key_pem()).unwrap();
    let server = Server::start_with(wsd_bin(), dir, config);
    let signing = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let claims = json!({"sub": "eve", "exp": now() + 60});
    let es = encode(&Header::new(Algorithm::ES256), &claims, &signing).unwrap();
    let mut c = connect(&server, &es);
    assert_eq!(subscribe(&mut c, "room"), json!({"subscribed": "room"}));
    // An HS256 token made with the public key as its secret is refused.
    let forged = encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(key.public_key_pem().as_bytes()),
    )
    .unwrap();
    let a = refused(&server, &format!("/?token={forged}"), "");
    assert_eq!(a.status, 401, "{a:?}");
}

#[test]
fn check_refuses_auth_without_a_usable_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("workers.toml");
    let base = "[[worker]]\nlisten = \"127.0.0.1:0\"\napp = \"pubsub\"\n";
    let check = |group: &str| check_config(&file, &format!("{base}{group}"));
    let (ok, err) = check("auth = \"jwt\"\n");
    assert!(
        !ok && err.contains("workers.toml:1:") && err.contains("needs one of"),
        "{err}"
    );
    let (ok, err) = check("auth = \"jwt\"\njwt_hs256_secret = \"short\"\n");
    assert!(!ok && err.contains("use at least 32"), "{err}");
    assert!(!err.contains("short\""), "the secret is not shown: {err}");
    let (ok, err) = check("auth = \"jwt\"\njwt_public_key = \"missing.pem\"\n");
    assert!(!ok && err.contains("cannot read jwt_public_key"), "{err}");
    std::fs::write(dir.path().join("bad.pem"), "not a key").unwrap();
    let (ok, err) = check("auth = \"jwt\"\njwt_public_key = \"bad.pem\"\n");
    assert!(!ok && err.contains("not a PEM RSA or EC"), "{err}");
    let (ok, err) = check("jwt_hs256_secret = \"0123456789abcdef0123456789abcdef\"\n");
    assert!(!ok && err.contains("need auth = \"jwt\""), "{err}");
    let (ok, err) = check("auth = \"oauth\"\n");
    assert!(!ok && err.contains("workers.toml:4:"), "{err}");
}
