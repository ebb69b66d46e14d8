//! The `workers.toml` schema: a `[server]` table and one `[[worker]]` table per group.
//!
//! Every key has a default, unknown keys are errors, and every error names the file, the
//! line and the reason (`workers.toml:7:9: count must be between 1 and 1024`). Values that
//! need checking (listen addresses, sizes, durations, counts) are parsed by their own
//! `Deserialize` impls, so the TOML parser attaches the line of the offending value for us.
//!
//! The schema is split by concept: `[server]` (`server.rs`), `[[worker]]` (`group.rs`), the
//! values written in wsd's own notation (`values.rs`), and what can be wrong (`error.rs`).

mod api;
mod error;
mod group;
mod handler;
mod server;
mod values;

pub use api::{ApiConfig, ApiProblem, MetricsConfig, Secret};
pub use error::{ConfigError, ConfigProblem, GroupProblem, ServerProblem, ValueError};
pub(crate) use group::topic_matches;
pub use group::{Auth, Compression, GroupConfig, Presence, SendBufferPolicy};
pub use handler::{EXEC_APP, WEBHOOK_APP, find_program};
pub use server::{RedisUrl, ServerConfig, SystemGroup, SystemUser};
pub use values::{Bytes, Listen, Seconds};

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// The whole configuration: server-wide settings and the worker groups it defines.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this came from, if any (a library program may run with no file).
    pub file: Option<PathBuf>,
    /// `[server]`.
    pub server: ServerConfig,
    /// The `[[worker]]` groups, in the file's order.
    pub groups: Vec<GroupConfig>,
    /// `[api]`: the backend HTTP API, if configured.
    pub api: Option<ApiConfig>,
    /// `[metrics]`: the master's Prometheus endpoint, if configured.
    pub metrics: Option<MetricsConfig>,
}

/// What `start`, `check` and `reload` all ask of the groups they would run, code's and the
/// file's together (the file's own were checked against each other with their lines): that
/// there is one, that no two take the same connections, and that `[api]`, if any, serves one
/// of them without taking their address. Returns the group the API serves.
pub fn check_runnable(
    groups: &[(&str, &Listen)],
    api: Option<&ApiConfig>,
) -> Result<Option<String>, ConfigProblem> {
    if groups.is_empty() {
        return Err(ConfigProblem::NoGroups);
    }
    if let Some(overlap) = first_overlap(groups) {
        return Err(overlap);
    }
    api.map(|a| a.group_among(groups))
        .transpose()
        .map_err(ConfigProblem::Api)
}

/// The first group (by name) whose listen address overlaps an earlier one's, as an error.
fn first_overlap(groups: &[(&str, &Listen)]) -> Option<ConfigProblem> {
    groups.iter().enumerate().find_map(|(i, (name, listen))| {
        let (them, _) = groups[..i].iter().find(|(_, l)| l.overlaps(listen))?;
        Some(ConfigProblem::Overlap {
            group: name.to_string(),
            listen: (*listen).clone(),
            other: them.to_string(),
        })
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSchema {
    server: Option<toml::Spanned<ServerConfig>>,
    #[serde(default, rename = "worker")]
    workers: Vec<toml::Spanned<GroupConfig>>,
    api: Option<toml::Spanned<ApiConfig>>,
    metrics: Option<MetricsConfig>,
}

impl Config {
    /// Defaults, for a library program started without a config file.
    pub fn empty() -> Config {
        Config {
            file: None,
            server: ServerConfig::default(),
            groups: Vec::new(),
            api: None,
            metrics: None,
        }
    }

    /// Reads and validates `path`. `apps` are the app names this program knows.
    pub fn load(path: &Path, apps: &[&str]) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            position: None,
            reason: Box::new(ConfigProblem::Read(e)),
        })?;
        Self::parse(path, &text, apps)
    }

    /// Validates `text`, the contents of `path` (which names the file in errors and anchors
    /// relative paths). `apps` are the app names this program knows.
    pub fn parse(path: &Path, text: &str, apps: &[&str]) -> Result<Config, ConfigError> {
        let at = |span: Option<std::ops::Range<usize>>, reason: ConfigProblem| ConfigError {
            file: path.to_path_buf(),
            position: span.map(|s| line_col(text, s.start)),
            reason: Box::new(reason),
        };
        let schema: FileSchema = toml::from_str(text).map_err(|e| {
            at(
                e.span(),
                ConfigProblem::Syntax(e.message().trim().to_string()),
            )
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let (mut server, server_span) = match schema.server {
            Some(s) => (s.get_ref().clone(), Some(s.span())),
            None => (ServerConfig::default(), None),
        };
        server.check().map_err(|r| at(server_span, r.into()))?;
        for p in [
            &mut server.pid_file,
            &mut server.control_socket,
            &mut server.log_file,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        let mut groups: Vec<GroupConfig> = Vec::new();
        for spanned in schema.workers {
            let span = spanned.span();
            let mut g = spanned.into_inner();
            if !apps.contains(&g.app.as_str()) {
                return Err(at(
                    Some(span),
                    ConfigProblem::UnknownApp {
                        app: g.app.clone(),
                        known: apps.iter().map(|a| a.to_string()).collect(),
                    },
                ));
            }
            g.check().map_err(|r| at(Some(span.clone()), r.into()))?;
            g.check_handler(&base)
                .map_err(|r| at(Some(span.clone()), r.into()))?;
            if let Some(dir) = &mut g.static_dir {
                if dir.is_relative() {
                    *dir = base.join(&*dir);
                }
                if !dir.is_dir() {
                    return Err(at(Some(span), ConfigProblem::NoStaticDir(dir.clone())));
                }
            }
            for p in [&mut g.tls_cert, &mut g.tls_key, &mut g.jwt_public_key]
                .into_iter()
                .flatten()
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
            #[cfg(feature = "tls")]
            g.load_tls().map_err(|e| at(Some(span.clone()), e.into()))?;
            #[cfg(feature = "jwt")]
            g.load_jwt().map_err(|e| at(Some(span.clone()), e.into()))?;
            if g.name.is_empty() {
                g.name = g.app.clone();
            }
            let name = g.name.clone();
            if let Some(other) = groups.iter().find(|o| o.listen.overlaps(&g.listen)) {
                return Err(at(
                    Some(span),
                    ConfigProblem::ListenTaken {
                        listen: g.listen.clone(),
                        group: other.name().to_string(),
                        its_listen: other.listen.clone(),
                    },
                ));
            }
            if groups.iter().any(|o| o.name() == name) {
                return Err(at(Some(span), ConfigProblem::DuplicateName(name)));
            }
            groups.push(g);
        }
        let api = match schema.api {
            Some(a) => {
                let span = a.span();
                let api = a.into_inner();
                api.check().map_err(|r| at(Some(span.clone()), r.into()))?;
                if let Some(g) = groups.iter().find(|g| g.listen.overlaps(&api.listen)) {
                    let taken = ApiProblem::ListenTaken {
                        listen: api.listen.addr.to_string(),
                        group: g.name().to_string(),
                    };
                    return Err(at(Some(span), taken.into()));
                }
                Some(api)
            }
            None => None,
        };
        Ok(Config {
            file: Some(path.to_path_buf()),
            server,
            groups,
            api,
            metrics: schema.metrics,
        })
    }

    /// Only the paths needed to reach a running master; tolerant of a config that no longer
    /// validates, so `wsd stop` works even after someone broke the file.
    pub fn locate(path: &Path) -> ServerConfig {
        let mut server = ServerConfig::default();
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let table: Option<toml::Table> = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.parse().ok());
        let section = table
            .as_ref()
            .and_then(|t| t.get("server"))
            .and_then(|s| s.as_table());
        let get = |key: &str| {
            section
                .and_then(|s| s.get(key))
                .and_then(|v| v.as_str())
                .map(PathBuf::from)
        };
        if let Some(p) = get("pid_file") {
            server.pid_file = p;
        }
        if let Some(p) = get("control_socket") {
            server.control_socket = p;
        }
        for p in [
            &mut server.pid_file,
            &mut server.control_socket,
            &mut server.log_file,
        ] {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        server
    }
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const APPS: &[&str] = &["echo", "hello", "clock"];

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/wsd/workers.toml"), text, APPS)
    }

    #[test]
    fn seed_config_parses_with_defaults() {
        let c =
            parse("[[worker]]\nlisten = \"websocket://0.0.0.0:2346\"\napp = \"hello\"\n").unwrap();
        assert_eq!(c.groups.len(), 1);
        let g = &c.groups[0];
        assert_eq!(g.count, 4);
        assert_eq!(g.name(), "hello");
        assert_eq!(g.listen.addr, "0.0.0.0:2346".parse().unwrap());
        assert_eq!(c.server.pid_file, PathBuf::from("/etc/wsd/wsd.pid"));
        assert_eq!(g.read_buffer_size, 64 << 10);
        assert_eq!(g.send_buffer_policy, SendBufferPolicy::Drop);
        assert!(g.trusted_proxies.is_empty() && g.allowed_origins.is_empty());
    }

    #[test]
    fn limits_parse_and_cross_check() {
        let c = parse(
            "[[worker]]\nlisten = \"127.0.0.1:1\"\nsend_buffer_policy = \"close\"\n\
             trusted_proxies = [\"10.0.0.0/8\", \"::1\"]\nallowed_origins = [\"https://a.com\"]\n\
             ping_interval = 0\nidle_timeout = \"2s\"\n",
        )
        .unwrap();
        let g = &c.groups[0];
        assert_eq!(g.send_buffer_policy, SendBufferPolicy::Close);
        assert_eq!(g.trusted_proxies.len(), 2);
        assert!(g.ping_interval.is_zero());
        let e = parse("[[worker]]\nlisten = \"127.0.0.1:1\"\ntrusted_proxies = [\"10.0.0/8\"]\n")
            .unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(3), "{e}");
        assert!(e.reason.to_string().contains("not a CIDR"), "{e}");
        let e =
            parse("[[worker]]\nlisten = \"127.0.0.1:1\"\nping_interval = 30\nidle_timeout = 10\n")
                .unwrap_err();
        assert!(e.reason.to_string().contains("idle_timeout"), "{e}");
        let e = parse("[[worker]]\nlisten = \"127.0.0.1:1\"\nsend_buffer_policy = \"block\"\n")
            .unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(3), "{e}");
        for (line, why) in [
            (
                "max_send_buffer = 1",
                "max_send_buffer must be at least 256 bytes",
            ),
            (
                "handshake_timeout = 0",
                "handshake_timeout must be longer than 0",
            ),
            (
                "max_frame_size = 0",
                "max_frame_size must be at least 1 byte",
            ),
            (
                "max_message_size = 0",
                "max_frame_size must not be larger than max_message_size",
            ),
        ] {
            let e = parse(&format!("[[worker]]\nlisten = \"127.0.0.1:1\"\n{line}\n")).unwrap_err();
            assert_eq!(e.position.map(|p| p.0), Some(1), "{e}");
            assert!(e.reason.to_string().contains(why), "{e}");
        }
    }

    #[test]
    fn compression_keys_parse_and_bad_values_name_their_line() {
        let g = &parse("[[worker]]\nlisten = \"127.0.0.1:1\"\n")
            .unwrap()
            .groups[0];
        assert_eq!(g.compression, Compression::Off);
        assert_eq!(
            (
                g.compression_window_bits,
                g.compression_min_size,
                g.compression_level
            ),
            (15, 64, 1)
        );
        let c = parse(
            "[[worker]]\nlisten = \"127.0.0.1:1\"\ncompression = \"dedicated\"\n\
             compression_window_bits = 10\ncompression_min_size = \"1KiB\"\ncompression_level = 6\n",
        )
        .unwrap();
        let g = &c.groups[0];
        assert_eq!(g.compression, Compression::Dedicated);
        assert_eq!(
            (
                g.compression_window_bits,
                g.compression_min_size,
                g.compression_level
            ),
            (10, 1024, 6)
        );
        for (line, why) in [
            ("compression = \"gzip\"", "unknown variant `gzip`"),
            (
                "compression_window_bits = 8",
                "compression_window_bits must be between 9 and 15, got 8",
            ),
            ("compression_window_bits = 16", "between 9 and 15, got 16"),
            ("compression_window_bits = -1", "between 9 and 15, got -1"),
            ("compression_min_size = -5", "size must not be negative"),
            (
                "compression_level = 0",
                "compression_level must be between 1 (fastest) and 9",
            ),
            ("compression_level = 10", "got 10"),
        ] {
            let e =
                parse(&format!("[[worker]]\nlisten = \"127.0.0.1:1\"\n\n{line}\n")).unwrap_err();
            assert_eq!(e.position.map(|p| p.0), Some(4), "{e}");
            assert!(e.reason.to_string().contains(why), "{e}");
        }
        // A group built in code is checked too.
        let mut g = GroupConfig::new(Listen::parse("127.0.0.1:1").unwrap());
        g.compression_window_bits = 8;
        assert_eq!(g.check(), Err(GroupProblem::WindowBits(8)));
        g.compression_window_bits = 9;
        g.compression_level = 0;
        assert_eq!(g.check(), Err(GroupProblem::CompressionLevel(0)));
    }

    #[test]
    fn errors_name_file_line_and_reason() {
        let e = parse(
            "[server]\nstop_timeout = 3\n\n[[worker]]\nlisten = \"ws://127.0.0.1:1\"\ncount = 0\n",
        )
        .unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(6), "{e}");
        assert!(e.to_string().starts_with("/etc/wsd/workers.toml:6:"), "{e}");
        assert!(
            e.reason
                .to_string()
                .contains("count must be between 1 and 1024"),
            "{e}"
        );

        let e =
            parse("[[worker]]\nlisten = \"ws://127.0.0.1:1\"\nmax_conections = 5\n").unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(3), "{e}");
        assert!(e.reason.to_string().contains("max_conections"), "{e}");

        let e = parse("[[worker]]\nlisten = \"ws://127.0.0.1:1\"\napp = \"nope\"\n").unwrap_err();
        assert!(e.reason.to_string().contains("unknown app \"nope\""), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(1), "{e}");
    }

    #[test]
    fn subprotocols_are_tokens_and_required_only_with_a_list() {
        let c = parse(
            "[[worker]]\nlisten = \"127.0.0.1:1\"\nsubprotocols = [\"v2.chat\", \"v1.chat\"]\n\
             require_subprotocol = true\n",
        )
        .unwrap();
        assert_eq!(c.groups[0].subprotocols, ["v2.chat", "v1.chat"]);
        assert!(c.groups[0].require_subprotocol);
        let d = parse("[[worker]]\nlisten = \"127.0.0.1:1\"\n").unwrap();
        assert!(d.groups[0].subprotocols.is_empty() && !d.groups[0].require_subprotocol);
        let e = parse("\n[[worker]]\nlisten = \"127.0.0.1:1\"\nrequire_subprotocol = true\n")
            .unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
        assert!(matches!(
            *e.reason,
            ConfigProblem::Group(GroupProblem::RequireWithoutSubprotocols)
        ));
        assert!(
            e.to_string().contains("require_subprotocol = true needs"),
            "{e}"
        );
        let e =
            parse("[[worker]]\nlisten = \"127.0.0.1:1\"\nsubprotocols = [\"a b\"]\n").unwrap_err();
        assert!(
            matches!(&*e.reason, ConfigProblem::Group(GroupProblem::BadSubprotocol(p)) if p == "a b"),
            "{e}"
        );
    }

    #[test]
    fn sizes_and_durations() {
        assert_eq!(Bytes::parse("64KiB").unwrap(), Bytes(65536));
        assert_eq!(Bytes::parse("16 MiB").unwrap(), Bytes(16 << 20));
        assert!(Bytes::parse("12 parsecs").is_err());
        assert_eq!(
            Seconds::parse("500ms").unwrap(),
            Seconds(Duration::from_millis(500))
        );
        assert_eq!(
            Seconds::parse("2m").unwrap(),
            Seconds(Duration::from_secs(120))
        );
        let c = parse("[[worker]]\nlisten = \"127.0.0.1:0\"\nmax_message_size = \"16MiB\"\nhandshake_timeout = 2.5\n").unwrap();
        assert_eq!(c.groups[0].max_message_size, 16 << 20);
        assert_eq!(c.groups[0].handshake_timeout, Duration::from_millis(2500));
    }

    #[test]
    fn server_timeouts_cross_check() {
        let c = parse("[server]\nclose_spread = \"2s\"\nreload_timeout = 60\n").unwrap();
        assert_eq!(c.server.close_spread, Duration::from_secs(2));
        assert_eq!(c.server.reload_timeout, Duration::from_secs(60));
        let e = parse("# top\n[server]\nstop_timeout = 1\n").unwrap_err();
        assert!(e.reason.to_string().contains("close_spread"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
    }

    #[test]
    fn user_and_group_are_resolved_when_read() {
        // root (uid and gid 0) exists on every system this runs on.
        let c = parse("[server]\nuser = \"root\"\ngroup = 0\n").unwrap();
        let user = c.server.user.unwrap();
        assert_eq!((user.uid.as_raw(), user.gid.as_raw()), (0, 0));
        assert_eq!(c.server.group.unwrap().name, "root");
        let c = parse("[server]\nuser = \"0\"\n").unwrap();
        assert_eq!(c.server.user.unwrap().name, "root");
        assert!(
            c.server.group.is_none(),
            "the primary group is applied at start"
        );
        let e = parse("[server]\nstop_timeout = 1\nuser = \"no-such-user-xyz\"\n").unwrap_err();
        assert_eq!(e.position, Some((3, 8)), "{e}");
        assert_eq!(e.reason.to_string(), "unknown user \"no-such-user-xyz\"");
        let e = parse("[server]\ngroup = \"no-such-group-xyz\"\n").unwrap_err();
        assert_eq!(e.position, Some((2, 9)), "{e}");
        assert_eq!(e.reason.to_string(), "unknown group \"no-such-group-xyz\"");
    }

    #[test]
    fn bus_address_and_static_dir_are_checked() {
        #[cfg(feature = "cluster")]
        {
            let c = parse("[server]\nbus = \"redis://127.0.0.1:6379/2\"\n").unwrap();
            assert_eq!(c.server.bus.unwrap().0, "redis://127.0.0.1:6379/2");
        }
        #[cfg(not(feature = "cluster"))]
        {
            let e = parse("[server]\nbus = \"redis://127.0.0.1:6379/2\"\n").unwrap_err();
            assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
            assert!(
                e.reason.to_string().contains("without the cluster feature"),
                "{e}"
            );
        }
        let e = parse("[server]\nbus = \"http://x\"\n").unwrap_err();
        assert_eq!(e.position.map(|p| p.0), Some(2), "{e}");
        assert!(e.reason.to_string().contains("redis://"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("workers.toml");
        let text = "[[worker]]\nlisten = \"127.0.0.1:0\"\nstatic_dir = \"public\"\n";
        let e = Config::parse(&file, text, APPS).unwrap_err();
        assert!(e.reason.to_string().contains("is not a directory"), "{e}");
        std::fs::create_dir(dir.path().join("public")).unwrap();
        let c = Config::parse(&file, text, APPS).unwrap();
        assert_eq!(c.groups[0].static_dir, Some(dir.path().join("public")));
    }

    #[test]
    fn duplicate_listen_is_rejected() {
        let e = parse("[[worker]]\nlisten = \"127.0.0.1:9\"\n[[worker]]\nname = \"b\"\nlisten = \"ws://127.0.0.1:9\"\n").unwrap_err();
        assert!(e.reason.to_string().contains("already used"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(3), "{e}");
        // A wildcard and a specific address on one port overlap; other families do not.
        let two = |a: &str, b: &str| {
            parse(&format!(
                "[[worker]]\nlisten = \"{a}\"\n[[worker]]\nname = \"b\"\nlisten = \"{b}\"\n"
            ))
        };
        let e = two("0.0.0.0:9", "127.0.0.1:9").unwrap_err();
        assert!(
            e.reason
                .to_string()
                .contains("already used by group \"echo\" (websocket://0.0.0.0:9)"),
            "{e}"
        );
        assert!(two("[::1]:9", "[::]:9").is_err());
        assert!(two("0.0.0.0:9", "[::]:9").is_ok());
        assert!(two("127.0.0.1:9", "127.0.0.2:9").is_ok());
        assert!(two("127.0.0.1:0", "0.0.0.0:0").is_ok());
    }

    #[test]
    fn code_and_file_groups_are_checked_together() {
        let l = |s: &str| Listen::parse(s).unwrap();
        let (a, b, c) = (l("0.0.0.0:9"), l("127.0.0.1:8"), l("127.0.0.1:9"));
        assert!(check_runnable(&[("a", &a), ("b", &b)], None).is_ok());
        assert_eq!(
            check_runnable(&[], None).map_err(|e| e.to_string()),
            Err("no [[worker]] group: nothing would run".into())
        );
        assert_eq!(
            first_overlap(&[("a", &a), ("b", &b), ("c", &c)]).map(|e| e.to_string()),
            Some(
                "group \"c\": listen websocket://127.0.0.1:9 is already used by group \"a\"".into()
            )
        );
    }

    #[test]
    fn bus_passwords_stay_out_of_logs() {
        let url = |s: &str| RedisUrl(s.to_string()).redacted();
        assert_eq!(url("redis://127.0.0.1:6379/0"), "redis://127.0.0.1:6379/0");
        assert_eq!(url("redis://:s3cret@h:1/2"), "redis://:***@h:1/2");
        assert_eq!(url("redis://me:s3cret@h:1/2"), "redis://me:***@h:1/2");
    }
}
