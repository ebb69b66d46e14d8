//! The keys of `app = "exec"`: a handler program per worker (`command`, `cwd`, `env`), whether
//! it decides upgrades (`authorize`, `connect_timeout`), and how much may wait for it
//! (`handler_queue`). A program that cannot run is an error of `wsd check`, with the file and
//! line, rather than a worker that starts and keeps backing off.

use super::{GroupConfig, GroupProblem};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The app that runs a handler.
pub const EXEC_APP: &str = "exec";
/// The app that POSTs events to a backend.
pub const WEBHOOK_APP: &str = "webhook";

impl GroupConfig {
    /// Checks the handler keys, and makes `cwd` absolute (relative to `base`, the config
    /// file's folder). The program must be an executable file: a path (relative to `cwd`), or
    /// a name found in `PATH`.
    pub fn check_handler(&mut self, base: &Path) -> Result<(), GroupProblem> {
        self.check_webhook()?;
        if self.app != EXEC_APP {
            let stray = [
                ("command", !self.command.is_empty()),
                ("cwd", self.cwd.is_some()),
                ("env", !self.env.is_empty()),
                ("authorize", self.authorize && self.app != WEBHOOK_APP),
            ];
            return match stray.iter().find(|(_, set)| *set) {
                Some((key, _)) => Err(GroupProblem::HandlerKeyWithoutExec(key)),
                None => Ok(()),
            };
        }
        let Some(program) = self.command.first() else {
            return Err(GroupProblem::NoCommand);
        };
        if self.connect_timeout.is_zero() {
            return Err(GroupProblem::NoConnectTime);
        }
        if self.handler_queue < self.max_message_size {
            return Err(GroupProblem::HandlerQueueSmall(self.max_message_size));
        }
        let cwd = match &self.cwd {
            Some(dir) if dir.is_relative() => base.join(dir),
            Some(dir) => dir.clone(),
            None => base.to_path_buf(),
        };
        if !cwd.is_dir() {
            return Err(GroupProblem::NotExecutable {
                program: program.clone(),
                why: "its cwd is not a folder",
            });
        }
        self.cwd = Some(cwd.clone());
        let found = find_program(program, &cwd).map_err(|why| GroupProblem::NotExecutable {
            program: program.clone(),
            why,
        })?;
        log::debug!("handler program {program:?} is {}", found.display());
        Ok(())
    }
}

impl GroupConfig {
    /// Checks the webhook keys: every event has an `http://` URL.
    fn check_webhook(&self) -> Result<(), GroupProblem> {
        let urls = [
            ("url", &self.url),
            ("connect_url", &self.connect_url),
            ("message_url", &self.message_url),
            ("close_url", &self.close_url),
        ];
        if self.app != WEBHOOK_APP {
            return match urls.iter().find(|(_, u)| u.is_some()) {
                Some((key, _)) => Err(GroupProblem::WebhookKeyWithoutWebhook(key)),
                None => Ok(()),
            };
        }
        for (key, url) in urls {
            if let Some(url) = url
                && !is_http_url(url)
            {
                return Err(GroupProblem::BadUrl {
                    key,
                    url: url.clone(),
                });
            }
        }
        let every = [&self.connect_url, &self.message_url, &self.close_url];
        if self.url.is_none() && every.iter().any(|u| u.is_none()) {
            return Err(GroupProblem::NoUrl);
        }
        if !(1..=64).contains(&self.webhook_connections) || self.webhook_timeout.is_zero() {
            return Err(GroupProblem::WebhookLimits);
        }
        Ok(())
    }

    /// The URL each event is POSTed to: connect, message, close.
    pub fn webhook_urls(&self) -> [String; 3] {
        let or_url =
            |u: &Option<String>| u.clone().or_else(|| self.url.clone()).unwrap_or_default();
        [
            or_url(&self.connect_url),
            or_url(&self.message_url),
            or_url(&self.close_url),
        ]
    }
}

/// `http://` and a host.
fn is_http_url(url: &str) -> bool {
    url.strip_prefix("http://")
        .and_then(|rest| rest.split(['/', '?']).next())
        .is_some_and(|host| !host.is_empty() && !host.contains(char::is_whitespace))
}

/// Where `program` is: a path with a `/` (relative to `cwd`), or the first executable of
/// that name in `PATH`.
pub fn find_program(program: &str, cwd: &Path) -> Result<PathBuf, &'static str> {
    if program.contains('/') {
        let path = cwd.join(program);
        return match executable(&path) {
            Some(true) => Ok(path),
            Some(false) => {
                Err("is not an executable file (chmod +x, or run it with its interpreter)")
            }
            None => Err("does not exist"),
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|p| executable(p) == Some(true))
        .ok_or("is not found in PATH")
}

/// `None` if nothing is there; whether it is a file someone may execute.
fn executable(path: &Path) -> Option<bool> {
    let meta = std::fs::metadata(path).ok()?;
    Some(meta.is_file() && meta.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Listen;

    fn exec(command: &[&str]) -> GroupConfig {
        let mut g = GroupConfig::new(Listen::parse("127.0.0.1:0").unwrap());
        g.app = EXEC_APP.into();
        g.command = command.iter().map(|s| s.to_string()).collect();
        g
    }

    #[test]
    fn the_program_must_be_there_and_executable() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        assert!(exec(&["sh", "-c", "true"]).check_handler(base).is_ok());
        std::fs::write(base.join("h.py"), "print()").unwrap();
        let e = exec(&["./h.py"]).check_handler(base).unwrap_err();
        assert!(e.to_string().contains("not an executable file"), "{e}");
        let e = exec(&["./missing"]).check_handler(base).unwrap_err();
        assert!(e.to_string().contains("does not exist"), "{e}");
        let e = exec(&["no-such-program-here"])
            .check_handler(base)
            .unwrap_err();
        assert!(e.to_string().contains("not found in PATH"), "{e}");
        assert!(matches!(
            exec(&[]).check_handler(base),
            Err(GroupProblem::NoCommand)
        ));
        let mut echo = exec(&[]);
        echo.app = "echo".into();
        echo.authorize = true;
        let e = echo.check_handler(base).unwrap_err();
        assert!(e.to_string().contains("authorize is for app"), "{e}");
    }
}
