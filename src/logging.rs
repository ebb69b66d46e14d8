//! One line per event: local time, level, process role and pid, message.
//!
//! `2026-11-24 10:00:00.123 INFO  master[4310] all workers ready`
//! `2026-11-24 10:00:05.002 WARN  chat#2[4312] ...`
//!
//! The filter is `RUST_LOG` if set, else `[server] log_level`. The role changes after fork.

use std::fmt::Write as _;
use std::io::Write;
use std::sync::Mutex;

static ROLE: Mutex<String> = Mutex::new(String::new());

/// Installs the logger; later calls are ignored.
pub fn init(level: &str) {
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| level.to_string());
    let _ = env_logger::Builder::new()
        .parse_filters(&filter)
        .format(|buf, rec| {
            let role = ROLE.lock().map(|r| r.clone()).unwrap_or_default();
            let role = if role.is_empty() {
                "wsd"
            } else {
                role.as_str()
            };
            writeln!(
                buf,
                "{} {:<5} {role}[{}] {}",
                chrono::Local::now().format("%Y-%m-%d %H:%M:%S%.3f"),
                rec.level(),
                std::process::id(),
                rec.args()
            )
        })
        .try_init();
}

/// Names this process in log lines: `master`, or `group#slot` in a worker.
pub fn set_role(role: &str) {
    if let Ok(mut r) = ROLE.lock() {
        *r = role.to_string();
    }
}

/// Bytes of client data shown in one log line; longer data is cut with a `…(N bytes)` suffix.
pub(crate) const SHOWN_BYTES: usize = 256;

/// Client-controlled bytes made safe for one log line: see [`escaped`].
pub struct Escaped<'a>(&'a [u8]);

/// Shows `data` in a log line without letting it forge lines or steer a terminal: control
/// characters (C0, DEL, C1) and the Unicode line and paragraph separators are escaped (`\n`,
/// `\r`, `\t`, else `\u{1b}`), as is the backslash itself (`\\`) so an escape cannot be faked;
/// bytes that are not UTF-8 show as `\xff`; past the first 256 bytes the rest is cut and the
/// whole length given: `…(4096 bytes)`.
///
/// ```
/// let line = format!("from client: {}", wsd::escaped("hi\nWARN forged"));
/// assert_eq!(line, r"from client: hi\nWARN forged");
/// ```
pub fn escaped<T: AsRef<[u8]> + ?Sized>(data: &T) -> Escaped<'_> {
    Escaped(data.as_ref())
}

impl std::fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut shown = 0;
        let mut room = |n: usize| {
            shown += n;
            shown <= SHOWN_BYTES
        };
        for chunk in self.0.utf8_chunks() {
            for c in chunk.valid().chars() {
                if !room(c.len_utf8()) {
                    return write!(f, "…({} bytes)", self.0.len());
                }
                match c {
                    '\n' => f.write_str("\\n")?,
                    '\r' => f.write_str("\\r")?,
                    '\t' => f.write_str("\\t")?,
                    '\\' => f.write_str("\\\\")?,
                    c if c.is_control() || matches!(c, '\u{2028}' | '\u{2029}') => {
                        write!(f, "\\u{{{:x}}}", c as u32)?
                    }
                    c => f.write_char(c)?,
                }
            }
            for b in chunk.invalid() {
                if !room(1) {
                    return write!(f, "…({} bytes)", self.0.len());
                }
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn show(data: &[u8]) -> String {
        escaped(data).to_string()
    }

    #[test]
    fn plain_text_is_shown_as_is() {
        assert_eq!(show(b"Hello Server!"), "Hello Server!");
        assert_eq!(show("héllo → 世界".as_bytes()), "héllo → 世界");
        assert_eq!(show(b""), "");
    }

    #[test]
    fn a_client_cannot_forge_a_log_line() {
        let forged = "hi\n2026-11-24 10:00:00.123 WARN  master[1] forged\r\tend";
        let shown = show(forged.as_bytes());
        assert_eq!(
            shown,
            "hi\\n2026-11-24 10:00:00.123 WARN  master[1] forged\\r\\tend"
        );
        assert!(!shown.contains(['\n', '\r', '\t']));
    }

    #[test]
    fn other_controls_and_bad_utf8_are_escaped() {
        assert_eq!(
            show(b"a\x1b[31mred\x00\x7f"),
            "a\\u{1b}[31mred\\u{0}\\u{7f}"
        );
        assert_eq!(
            show("c1 \u{9b} ls \u{2028}".as_bytes()),
            "c1 \\u{9b} ls \\u{2028}"
        );
        assert_eq!(show(b"bad \xff\xc3 end"), "bad \\xff\\xc3 end");
        // A backslash is escaped too, so `\n` typed by the client is not a real escape.
        assert_eq!(show(b"typed \\n"), "typed \\\\n");
    }

    #[test]
    fn long_data_is_cut_at_a_character_with_its_length() {
        let long = "é".repeat(SHOWN_BYTES);
        let shown = show(long.as_bytes());
        let kept = "é".repeat(SHOWN_BYTES / 2);
        assert_eq!(shown, format!("{kept}…({} bytes)", SHOWN_BYTES * 2));
        let exact = "x".repeat(SHOWN_BYTES);
        assert_eq!(show(exact.as_bytes()), exact);
        let over = format!("{exact}\n");
        assert_eq!(
            show(over.as_bytes()),
            format!("{exact}…({} bytes)", SHOWN_BYTES + 1)
        );
    }
}
