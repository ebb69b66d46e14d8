//! `wsd start -d`: detach from the terminal (fork, setsid, fork) and report back.
//!
//! The process the operator started waits on a pipe until the daemon says the workers are up
//! (then it prints the banner and exits 0) or that start failed (it prints why and exits 1),
//! so `wsd start -d && wsd status` is race-free and a failed start never looks like success.

use crate::sys::{self, Fork};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;

/// Where the master announces the outcome of its start.
pub enum Announce {
    /// Foreground: print the banner on stdout.
    Stdout,
    /// Daemon: tell the waiting parent through this pipe.
    Pipe(File),
    /// Already announced.
    Done,
}

impl Announce {
    pub fn ready(&mut self, banner: &str) {
        match std::mem::replace(self, Announce::Done) {
            Announce::Stdout => {
                print!("{banner}");
                let _ = io::stdout().flush();
            }
            Announce::Pipe(mut f) => {
                let _ = write!(f, "ok\n{banner}");
            }
            Announce::Done => {}
        }
    }

    pub fn failed(&mut self, reason: &str) {
        match std::mem::replace(self, Announce::Done) {
            Announce::Stdout => eprintln!("wsd: {reason}"),
            Announce::Pipe(mut f) => {
                let _ = write!(f, "error\n{reason}");
            }
            Announce::Done => {}
        }
    }
}

/// Detaches. Returns in the daemon only; the original process exits with the start's outcome.
pub fn detach(log_file: &Path) -> io::Result<Announce> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_file)?;
    let (reader, writer) = nix::unistd::pipe().map_err(io::Error::from)?;
    match sys::fork()? {
        Fork::Parent(_) => {
            drop(writer);
            let mut said = String::new();
            let _ = File::from(reader).read_to_string(&mut said);
            let code = match said.split_once('\n') {
                Some(("ok", banner)) => {
                    print!("{banner}");
                    0
                }
                Some((_, reason)) => {
                    eprintln!("wsd: {reason}");
                    1
                }
                None => {
                    eprintln!(
                        "wsd: the master exited during start; see {}",
                        log_file.display()
                    );
                    1
                }
            };
            let _ = io::stdout().flush();
            std::process::exit(code);
        }
        Fork::Child => {}
    }
    drop(reader);
    nix::unistd::setsid().map_err(io::Error::from)?;
    if let Fork::Parent(_) = sys::fork()? {
        std::process::exit(0);
    }
    sys::redirect_stdio(&log)?;
    Ok(Announce::Pipe(File::from(writer)))
}
