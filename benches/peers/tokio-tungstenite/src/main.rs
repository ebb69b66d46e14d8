//! tokio-tungstenite 0.30 echo server for scripts/bench-peers.sh: one thread (a current_thread
//! runtime), a task per connection, text and binary messages sent back as they came, as the
//! crate's own echo-server example does it (`forward` feeds replies while more input is ready
//! and flushes once when it is not). Tungstenite answers pings and the close handshake itself.
//! Given a certificate and key, it serves wss:// through tokio-rustls, with wsd's rustls
//! configuration (`raw_echo::server_config`: ring, TLS 1.3 and 1.2).
//!
//! One setting differs from the defaults, so that the comparison is with tungstenite at its
//! reasonable best rather than a strawman: `read_buffer_size` is 4 KiB instead of 128 KiB. Each
//! read zero-fills the buffer up to that size, and a message leaves with part of it, so the
//! default costs a 128 KiB allocation and memset per message (about a third of the 32-byte echo
//! rate here) and 128 KiB of resident memory per idle connection. `TUNGSTENITE_READ_BUFFER`
//! (bytes) overrides it, e.g. 131072 for the default.
//!
//! Usage: peer-tokio-tungstenite PORT [CERT KEY]   (listens on 127.0.0.1:PORT)

use futures_util::{StreamExt, TryStreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::Error;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let port: Option<u16> = args.first().and_then(|p| p.parse().ok());
    let (Some(port), 1 | 3) = (port, args.len()) else {
        eprintln!("usage: peer-tokio-tungstenite PORT [CERT KEY]");
        std::process::exit(2)
    };
    let tls =
        (args.len() == 3).then(|| TlsAcceptor::from(raw_echo::server_config(&args[1], &args[2])));
    let read_buffer = std::env::var("TUNGSTENITE_READ_BUFFER")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4096);
    let config = WebSocketConfig::default().read_buffer_size(read_buffer);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind");
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        println!("tokio-tungstenite listening on {scheme}://127.0.0.1:{port} (read buffer {read_buffer} B)");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue; // EMFILE and the like: try again
            };
            let tls = tls.clone();
            tokio::spawn(async move {
                let _ = stream.set_nodelay(true);
                let _ = match tls {
                    Some(tls) => match tls.accept(stream).await {
                        Ok(stream) => serve(stream, config).await,
                        Err(e) => Err(e.into()),
                    },
                    None => serve(stream, config).await,
                };
            });
        }
    });
}

async fn serve<S>(stream: S, config: WebSocketConfig) -> Result<(), Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ws = tokio_tungstenite::accept_async_with_config(stream, Some(config)).await?;
    let (write, read) = ws.split();
    read.try_filter(|m| std::future::ready(m.is_text() || m.is_binary()))
        .forward(write)
        .await
}
