//! The read path over TLS: `data` is the plaintext a TLS client sends (an HTTP/1.1 upgrade
//! request, then masked WebSocket frames) after a real handshake with the worker.
//! `wsd::fuzzing::feed_tls` serves it with a real worker loop over loopback, so the record
//! layer meets the input cut into records and reads every way; any panic is a bug. The
//! certificate is made once per process. Run with `TARGET=read_path_tls scripts/fuzz.sh`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

static CERT: OnceLock<(String, String)> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let (chain, key) = CERT.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("a key");
        let params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
        (params.self_signed(&key).expect("a certificate").pem(), key.serialize_pem())
    });
    wsd::fuzzing::feed_tls(chain, key, data);
});
