//! wss:// with real certificates (made here with rcgen, never committed), a real rustls client
//! and a real server: echo over TLS 1.2 and 1.3 with ECDSA and RSA keys, static files over
//! https, bad certificate files refused by `check`, `start` and `reload` while the running
//! certificate stays, a renewal by `reload` that new clients see and old ones do not notice,
//! and clients that speak plain HTTP, garbage or nothing at a TLS port.

mod common;

use common::*;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tungstenite::{Message, WebSocket};

/// A certificate for `localhost` and its key, as PEM.
struct Cert {
    chain: String,
    key: String,
    serial: Vec<u8>,
}

enum Key {
    Ecdsa,
    Rsa,
}

impl Cert {
    fn new(kind: Key, serial: u8, days: i64) -> Cert {
        let key = match kind {
            Key::Ecdsa => rcgen::KeyPair::generate().unwrap(),
            Key::Rsa => {
                use rsa::pkcs8::EncodePrivateKey;
                let mut rng = rsa::rand_core::OsRng;
                let rsa = rsa::RsaPrivateKey::new(&mut rng, 2048).unwrap();
                let pem = rsa.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
                rcgen::KeyPair::from_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).unwrap()
            }
        };
        let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        let serial = vec![0x10, serial];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + time::Duration::days(days);
        let cert = params.self_signed(&key).unwrap();
        Cert {
            chain: cert.pem(),
            key: key.serialize_pem(),
            serial,
        }
    }

    fn write(&self, dir: &Path) {
        std::fs::write(dir.join("cert.pem"), &self.chain).unwrap();
        std::fs::write(dir.join("key.pem"), &self.key).unwrap();
    }
}

/// What a test does to good certificate files to make them bad.
type Spoil<'a> = Box<dyn Fn(&Path) + 'a>;

const TLS_KEYS: &str = "tls_cert = \"cert.pem\"\ntls_key = \"key.pem\"\n";

/// A TLS group serving `app` × `count` with `cert`, plus `extra` lines.
fn start(app: &str, count: usize, cert: &Cert, extra: &str) -> Server {
    let (dir, config) = Server::config(app, count, &format!("{TLS_KEYS}{extra}"));
    cert.write(dir.path());
    Server::start_with(wsd_bin(), dir, config)
}

/// A TLS group serving `app` × `count` with `cert` and `drain_timeout = drain`; with its
/// config file and that file's text.
fn start_draining(
    app: &str,
    count: usize,
    cert: &Cert,
    drain: &str,
) -> (Server, std::path::PathBuf, String) {
    let (dir, config) = Server::config(app, count, TLS_KEYS);
    cert.write(dir.path());
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text.replace(
        "[server]\n",
        &format!("[server]\ndrain_timeout = \"{drain}\"\n"),
    );
    std::fs::write(&config, &text).unwrap();
    let server = Server::start_with(wsd_bin(), dir, config.clone());
    (server, config, text)
}

/// `wsd -c config check`.
fn check(config: &Path) -> std::process::Output {
    std::process::Command::new(wsd_bin())
        .arg("-c")
        .arg(config)
        .arg("check")
        .output()
        .unwrap()
}

/// A client config that trusts `cert` alone, for the given TLS versions.
fn client_config(
    cert: &Cert,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(cert.chain.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

type Tls = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A TLS connection to the server, handshake done.
fn tls_connect(port: u16, config: Arc<rustls::ClientConfig>) -> Result<Tls, String> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(|e| e.to_string())?;
    }
    Ok(tls)
}

/// A wss:// client.
fn wss(port: u16, config: Arc<rustls::ClientConfig>) -> WebSocket<Tls> {
    let tls = tls_connect(port, config).expect("TLS handshake");
    let (ws, _) = tungstenite::client("wss://localhost/", tls).expect("upgrade");
    ws
}

fn echo(ws: &mut WebSocket<Tls>, text: &str) {
    send(ws, Message::text(text)).unwrap();
    loop {
        match read(ws).unwrap() {
            Message::Text(t) => {
                assert_eq!(t.as_str(), text);
                return;
            }
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// The serial of the certificate the server presents to a new client.
fn served_serial(port: u16, config: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let tls = tls_connect(port, config).expect("TLS handshake");
    let leaf = tls.conn.peer_certificates().unwrap()[0].clone();
    let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
    parsed.tbs_certificate.raw_serial().to_vec()
}

/// Whatever the server answers before it closes, read to the end.
fn answer_to(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let _ = s.write_all(bytes);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    out
}

fn tls12_13() -> Vec<&'static rustls::SupportedProtocolVersion> {
    vec![&rustls::version::TLS13, &rustls::version::TLS12]
}

#[test]
fn wss_echoes_over_tls_12_and_13_with_ecdsa_and_rsa_keys() {
    for kind in [Key::Ecdsa, Key::Rsa] {
        let cert = Cert::new(kind, 1, 30);
        let mut server = start("echo", 2, &cert, "");
        let st = server.status();
        assert!(
            st["groups"][0]["listen"]
                .as_str()
                .unwrap()
                .starts_with("wss://"),
            "{st}"
        );
        for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
            let config = client_config(&cert, &[version]);
            let mut ws = wss(server.port, config);
            assert_eq!(
                ws.get_ref().conn.alpn_protocol(),
                Some(&b"http/1.1"[..]),
                "ALPN"
            );
            echo(&mut ws, "hello over TLS");
            // Larger than a TLS record: split and rejoined.
            echo(&mut ws, &"x".repeat(100_000));
            ws.close(None).unwrap();
            // The closing handshake ends with the server's close_notify: rustls reads a clean
            // end of stream, not an unexpected EOF.
            loop {
                match read(&mut ws) {
                    Ok(_) => {}
                    Err(tungstenite::Error::ConnectionClosed) => break,
                    Err(e) => panic!("not a clean close: {e}"),
                }
            }
            let mut tls = ws.into_inner();
            let mut rest = Vec::new();
            assert_eq!(
                tls.read_to_end(&mut rest).unwrap(),
                0,
                "close_notify, then EOF"
            );
        }
    }
}

#[test]
fn static_files_and_plain_gets_work_over_https() {
    let cert = Cert::new(Key::Ecdsa, 2, 30);
    let (dir, config) = Server::config("echo", 1, &format!("{TLS_KEYS}static_dir = \"www\"\n"));
    cert.write(dir.path());
    std::fs::create_dir(dir.path().join("www")).unwrap();
    std::fs::write(dir.path().join("www/index.html"), "<h1>over TLS</h1>").unwrap();
    let server = Server::start_with(wsd_bin(), dir, config);
    let mut tls = tls_connect(server.port, client_config(&cert, &tls12_13())).unwrap();
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut page = Vec::new();
    let _ = tls.read_to_end(&mut page);
    let page = String::from_utf8_lossy(&page);
    assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
    assert!(page.ends_with("<h1>over TLS</h1>"), "{page}");
}

#[test]
fn bad_certificate_files_are_refused_with_the_file_and_the_reason() {
    let good = Cert::new(Key::Ecdsa, 3, 30);
    let other = Cert::new(Key::Ecdsa, 4, 30);
    let cases: [(&str, Spoil<'_>, &str); 4] = [
        (
            "missing",
            Box::new(|d| std::fs::remove_file(d.join("cert.pem")).unwrap()),
            "cert.pem: cannot read",
        ),
        (
            "not PEM",
            Box::new(|d| std::fs::write(d.join("cert.pem"), "hello\n").unwrap()),
            "cert.pem: no PEM certificate",
        ),
        (
            "bad PEM",
            Box::new(|d| {
                let broken =
                    "-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n";
                std::fs::write(d.join("cert.pem"), broken).unwrap()
            }),
            "cert.pem: no PEM certificate",
        ),
        (
            "mismatched key",
            Box::new(|d| std::fs::write(d.join("key.pem"), &other.key).unwrap()),
            "key.pem: the private key does not match the certificate",
        ),
    ];
    for (what, spoil, reason) in cases {
        let (dir, config) = Server::config("echo", 1, TLS_KEYS);
        good.write(dir.path());
        spoil(dir.path());
        let out = check(&config);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{what}: {err}");
        assert!(
            err.contains("workers.toml:"),
            "{what}: names the config: {err}"
        );
        assert!(err.contains(reason), "{what}: {err}");
        let (_, err) = refused_start(&config);
        assert!(err.contains(reason), "{what}: start: {err}");
    }
}

#[test]
fn check_warns_of_a_certificate_about_to_expire() {
    let (dir, config) = Server::config("echo", 1, TLS_KEYS);
    Cert::new(Key::Ecdsa, 5, 5).write(dir.path());
    let out = check(&config);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a warning, not an error: {text}");
    assert!(
        text.contains("expires in 4 days") || text.contains("expires in 5 days"),
        "{text}"
    );
    Cert::new(Key::Ecdsa, 6, 90).write(dir.path());
    let out = check(&config);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("expires"));
}

#[test]
fn reload_renews_the_certificate_without_touching_open_connections() {
    let first = Cert::new(Key::Ecdsa, 7, 30);
    let second = Cert::new(Key::Ecdsa, 8, 30);
    let mut server = start("echo", 2, &first, "");
    let pids = server.worker_pids();
    let trust_both = {
        let mut both = Cert::new(Key::Ecdsa, 9, 1);
        both.chain = format!("{}{}", first.chain, second.chain);
        client_config(&both, &tls12_13())
    };
    let mut old: Vec<_> = (0..4)
        .map(|_| wss(server.port, trust_both.clone()))
        .collect();
    assert_eq!(served_serial(server.port, trust_both.clone()), first.serial);

    // A bad certificate: the reload is refused and the old one stays in service.
    std::fs::write(server.dir.path().join("cert.pem"), "garbage\n").unwrap();
    let out = server.wsd(&["reload"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cert.pem: no PEM certificate"), "{err}");
    assert_eq!(served_serial(server.port, trust_both.clone()), first.serial);

    second.write(server.dir.path());
    let out = server.wsd(&["reload"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("certificate renewed"), "{said}");
    // Every worker hands out the new certificate; none was replaced.
    wait_for("the new certificate on every worker", DEADLINE, || {
        (0..8)
            .all(|_| served_serial(server.port, trust_both.clone()) == second.serial)
            .then_some(())
    });
    assert_eq!(server.worker_pids(), pids, "the workers stayed");
    for (i, ws) in old.iter_mut().enumerate() {
        echo(ws, &format!("still here {i}"));
    }
}

/// A TLS session does not travel: in a reload that hands the plain clients over, a replaced
/// worker serves its wss:// clients on through `drain_timeout`, then closes them with 1012
/// (Service Restart). New clients go to the new worker from the start.
#[test]
fn a_reload_serves_wss_clients_through_the_drain_then_tells_them_1012() {
    let cert = Cert::new(Key::Ecdsa, 11, 30);
    let (mut server, config, text) = start_draining("echo", 1, &cert, "2s");
    let trust = client_config(&cert, &tls12_13());
    let old_pid = server.worker_pid(0);
    let mut kept: Vec<_> = (0..2).map(|_| wss(server.port, trust.clone())).collect();
    for (i, ws) in kept.iter_mut().enumerate() {
        echo(ws, &format!("before {i}"));
    }

    // A changed setting, so the worker is replaced.
    std::fs::write(&config, format!("{text}handshake_timeout = \"9s\"\n")).unwrap();
    let bin = server.bin.clone();
    let reload = std::thread::spawn(move || {
        std::process::Command::new(bin)
            .args(["-c", config.to_str().unwrap(), "reload"])
            .output()
            .unwrap()
    });
    let new_pid = wait_for("the new worker", DEADLINE, || {
        let st = server.try_status()?;
        let pids = worker_pids_in(&st);
        pids.into_iter().find(|&p| p > 0 && p != old_pid)
    });
    // Served on by the old worker meanwhile; a new client goes to the new one.
    for (i, ws) in kept.iter_mut().enumerate() {
        echo(ws, &format!("during {i}"));
    }
    let mut fresh = wss(server.port, trust.clone());
    echo(&mut fresh, "fresh");
    let local = fresh.get_ref().sock.local_addr().unwrap().port();
    assert_eq!(connection_owners(&server)[&local], new_pid);
    assert!(alive(old_pid), "the old worker is draining");
    // Then 1012, and the reload is done once the old worker has gone.
    for ws in &mut kept {
        let code = loop {
            match read(ws) {
                Ok(Message::Close(f)) => break f.map(|f| u16::from(f.code)),
                Ok(_) => continue,
                Err(e) => panic!("ended without a close frame: {e}"),
            }
        };
        assert_eq!(code, Some(1012));
    }
    let out = reload.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    wait_for("the old worker to exit", DEADLINE, || {
        exited(old_pid).then_some(())
    });
    echo(&mut fresh, "still served");
}

/// The next text a client hears.
fn hear(ws: &mut WebSocket<Tls>) -> String {
    loop {
        match read(ws).unwrap() {
            Message::Text(t) => return t.as_str().to_string(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Drained wss:// clients stay on the group's bus: through the drain of a reload, or of an
/// upgrade (done, with one worker, as soon as it begins: the lines stay for the drain), what
/// the new workers' clients say reaches them, and what they say reaches those clients, each
/// line once (`chat` relays every line to every client, the sender included).
fn drained_wss_clients_stay_on_the_bus(upgrade: bool) {
    let cert = Cert::new(Key::Ecdsa, 12, 30);
    let count = if upgrade { 1 } else { 2 };
    let (mut server, config, text) = start_draining("chat", count, &cert, "60s");
    let trust = client_config(&cert, &tls12_13());
    let old_pids = server.worker_pids();
    let mut clients: Vec<_> = (0..4).map(|_| wss(server.port, trust.clone())).collect();

    let mut cmd = std::process::Command::new(&server.bin);
    cmd.arg("-c").arg(&config);
    if upgrade {
        let next = server.dir.path().join("wsd-next");
        std::fs::copy(&server.bin, &next).unwrap();
        cmd.args(["upgrade", "--binary", next.to_str().unwrap()]);
    } else {
        // A changed setting, so the workers are replaced.
        std::fs::write(&config, format!("{text}handshake_timeout = \"9s\"\n")).unwrap();
        cmd.arg("reload");
    }
    let deploy = std::thread::spawn(move || cmd.output().unwrap());
    match upgrade {
        // The old master answers `status` until it has gone.
        true => server.wait_for_log("the upgrade is done"),
        false => wait_for("the new workers", DEADLINE, || {
            let pids = worker_pids_in(&server.try_status()?);
            let new = pids.iter().filter(|p| **p > 0 && !old_pids.contains(p));
            (new.count() == count).then_some(())
        }),
    }
    let fresh: Vec<_> = (0..4).map(|_| wss(server.port, trust.clone())).collect();
    let kept = clients.len();
    clients.extend(fresh);
    // One line at a time, from each client in turn: every client hears it, once.
    for i in 0..clients.len() {
        let line = format!("line {i}");
        clients[i].send(Message::text(line.clone())).unwrap();
        for (j, ws) in clients.iter_mut().enumerate() {
            assert_eq!(hear(ws), line, "client {j}");
        }
    }
    let owners = connection_owners(&server);
    for ws in &clients[..kept] {
        let port = ws.get_ref().sock.local_addr().unwrap().port();
        let pid = owners[&port];
        assert!(
            old_pids.contains(&pid),
            "an old worker drains client {port}"
        );
    }
    // The drain ends as the drained clients leave.
    for ws in &mut clients[..kept] {
        ws.close(None).unwrap();
        while read(ws).is_ok() {}
    }
    let out = deploy.join().unwrap();
    assert!(out.status.success(), "{out:?}");
    for &pid in &old_pids {
        wait_for("the old worker to exit", DEADLINE, || {
            exited(pid).then_some(())
        });
    }
    let line = "after".to_string();
    clients[kept].send(Message::text(line.clone())).unwrap();
    for ws in &mut clients[kept..] {
        assert_eq!(hear(ws), line);
    }
}

#[test]
fn drained_wss_clients_hear_and_are_heard_through_a_reload() {
    drained_wss_clients_stay_on_the_bus(false);
}

#[test]
fn drained_wss_clients_hear_and_are_heard_through_an_upgrade() {
    drained_wss_clients_stay_on_the_bus(true);
}

#[test]
fn plain_http_garbage_and_silence_on_a_tls_port_cost_only_their_connection() {
    let cert = Cert::new(Key::Ecdsa, 10, 30);
    let server = start("echo", 1, &cert, "handshake_timeout = \"1s\"\n");
    let config = client_config(&cert, &tls12_13());
    let mut steady = wss(server.port, config.clone());
    echo(&mut steady, "before");

    let answer = answer_to(server.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 400 Bad Request\r\n"),
        "{answer}"
    );
    assert!(answer.contains("this port speaks TLS"), "{answer}");

    let garbage = XorShift::new(7).bytes(4096);
    let answer = answer_to(
        server.port,
        &[&b"\x16\x03\x01\x02\x00"[..], &garbage].concat(),
    );
    assert!(
        !answer.starts_with(b"HTTP"),
        "no HTTP answer to TLS garbage"
    );

    // A slowloris: a few bytes of a ClientHello, then nothing. The handshake timeout ends it.
    let mut slow = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(15)))
        .unwrap();
    slow.write_all(b"\x16\x03\x01").unwrap();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    echo(&mut steady, "after");
    let mut fresh = wss(server.port, config.clone());
    echo(&mut fresh, "a new client too");

    // A client that says close_notify mid-connection, keeping its socket open, is let go.
    let mut quitter = wss(server.port, config);
    echo(&mut quitter, "bye");
    let tls = quitter.get_mut();
    tls.conn.send_close_notify();
    tls.conn.complete_io(&mut tls.sock).unwrap();
    let mut rest = Vec::new();
    if let Err(e) = tls.sock.read_to_end(&mut rest) {
        assert!(
            !matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "the server kept the connection after close_notify"
        );
    }
    echo(&mut steady, "still served");
}

/// Large messages go out sealed in batches of records, to a client whose small receive
/// window keeps the server waiting on the socket again and again (a 6 MiB echo is more than
/// the kernel's largest send buffer, 4 MiB): every byte arrives, in order, and the connection
/// still echoes afterwards.
#[test]
fn large_messages_to_a_slow_reader_arrive_whole() {
    let cert = Cert::new(Key::Ecdsa, 1, 30);
    let limits =
        "max_frame_size = 8388608\nmax_message_size = 8388608\nmax_send_buffer = 16777216\n";
    let server = start("echo", 1, &cert, limits);
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], server.port).into();
    sock.connect(&addr.into()).unwrap();
    let tcp: TcpStream = sock.into();
    tcp.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(client_config(&cert, &tls12_13()), name).unwrap();
    let (mut ws, _) =
        tungstenite::client("wss://localhost/", rustls::StreamOwned::new(conn, tcp)).unwrap();
    for round in 0..3u32 {
        // 6 MiB that no two rounds, and no two records of a round, share.
        let payload: Vec<u8> = (0..6u32 << 20)
            .map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(round) >> 13) as u8)
            .collect();
        send(&mut ws, Message::binary(payload.clone())).unwrap();
        loop {
            match read(&mut ws).unwrap() {
                Message::Binary(b) => {
                    assert!(b == payload, "round {round}: the echo differs");
                    break;
                }
                Message::Ping(_) | Message::Pong(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    echo(&mut ws, "still here");
}
