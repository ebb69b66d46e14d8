//! The server's side of the figures: which processes it runs, the CPU time they spend while
//! a run measures, and (for `idle`) the memory they hold.
//!
//! A client-side figure alone cannot tell a cheap server from one that burns both cores to
//! keep up, so every mode can read the server's own accounts from `/proc`: utime + stime of
//! `/proc/<pid>/stat` for CPU, `Rss`/`Pss` of `/proc/<pid>/smaps_rollup` for memory. Pss is the
//! headline memory figure: forked workers share pages with the master, and a page a worker
//! makes private by writing to it costs memory that Rss does not show.
//!
//! The pids come from `--pid` (any server) or from the wsd control socket, by running this
//! same program as `-c FILE status --json` (the master's pid and every worker's), once per
//! host when a run spans several (`api`'s `--host-config`). Without either, the server's
//! figures are left out.

use super::BenchError;
use crate::control::Status;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// How to find the server's processes (`--pid`, `--config`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct ServerArgs {
    /// The server's pids, to read its CPU time (and memory, for `idle`) from /proc
    #[arg(
        long,
        value_name = "PID[,PID...]",
        value_delimiter = ',',
        conflicts_with = "config"
    )]
    pub pid: Vec<i32>,
    /// A wsd config file: the pids of its master and workers come from `wsd -c FILE status`
    /// (`wsd -c FILE bench ...` and WSD_CONFIG set it too: clap hands the global down)
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

/// The server's processes.
#[derive(Debug, Clone)]
pub struct Procs {
    /// wsd's masters (one per host), when the pids came from their status (they hold no
    /// connections).
    pub masters: Vec<i32>,
    /// Processes holding connections: wsd's workers (of every host), or every `--pid`.
    pub workers: Vec<i32>,
    /// The first host's config, for `idle`'s connection counts.
    config: Option<PathBuf>,
}

/// CPU and memory of the server's processes at one moment.
#[derive(Debug, Clone)]
pub struct Sample {
    /// ns on the run's common clock.
    pub at: u64,
    /// utime and stime in clock ticks, per process of [`Procs::all`] (`None`: unreadable).
    cpu: Vec<Option<Ticks>>,
    /// Per worker, when memory was asked for.
    pub memory: Vec<Option<Memory>>,
    /// Busy and total clock ticks of every core of the machine (`/proc/stat`), whoever
    /// spent them: a core can be saturated by work no process is charged for (softirqs).
    pub cores: Vec<(u64, u64)>,
}

/// A process's CPU time so far, in clock ticks: in user space and in the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ticks {
    pub user: u64,
    pub system: u64,
}

/// A process's resident memory, in KiB.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Memory {
    pub rss_kib: u64,
    pub pss_kib: u64,
}

/// The server's samples over one run.
#[derive(Debug, Clone)]
pub struct ServerRun {
    pub procs: Procs,
    /// Before the client processes start.
    pub start: Sample,
    /// When measuring begins.
    pub go: Option<Sample>,
    /// `idle`: at the end of the hold, every connection still open.
    pub held: Option<Sample>,
    /// When every client process has reported its end.
    pub end: Option<Sample>,
    /// `idle`: connections per worker as wsd's status last reported them (with `--config`).
    pub connections: Option<Vec<u64>>,
}

impl Procs {
    /// The server's processes from `--pid` or `--config` (and the configs of more hosts,
    /// `more`); `None` if none was given.
    pub fn discover(args: &ServerArgs, more: &[PathBuf]) -> Result<Option<Procs>, BenchError> {
        if !args.pid.is_empty() {
            return Ok(Some(Procs::of(args.pid.clone())));
        }
        let configs: Vec<&PathBuf> = args.config.iter().chain(more).collect();
        let Some(&first) = configs.first() else {
            return Ok(None);
        };
        let mut procs = Procs {
            masters: Vec::new(),
            workers: Vec::new(),
            config: Some(first.clone()),
        };
        for config in configs {
            let st = status(config)?;
            if st.workers.is_empty() {
                return Err(BenchError::Server(format!(
                    "{} runs no workers",
                    config.display()
                )));
            }
            procs.masters.push(st.master.pid);
            procs.workers.extend(st.workers.iter().map(|w| w.pid));
        }
        Ok(Some(procs))
    }

    /// Given processes, all counted as workers (`wsd bench`'s own client processes, or any
    /// server's `--pid`).
    pub fn of(pids: Vec<i32>) -> Procs {
        Procs {
            masters: Vec::new(),
            workers: pids,
            config: None,
        }
    }

    /// Every process: the masters (if known), then the workers.
    pub fn all(&self) -> impl Iterator<Item = i32> + '_ {
        self.masters.iter().chain(&self.workers).copied()
    }

    pub fn sample(&self, at: u64, with_memory: bool) -> Sample {
        let memory = if with_memory {
            self.workers.iter().map(|&pid| memory_of(pid)).collect()
        } else {
            Vec::new()
        };
        Sample {
            at,
            cpu: self.all().map(cpu_ticks_of).collect(),
            memory,
            cores: std::fs::read_to_string("/proc/stat")
                .map(|t| core_ticks(&t))
                .unwrap_or_default(),
        }
    }

    /// Connections per worker, in [`Procs::workers`] order, from wsd's status; `None`
    /// without `--config` or if a worker is missing from the answer (it was replaced).
    pub fn connections(&self) -> Option<Vec<u64>> {
        let st = status(self.config.as_ref()?).ok()?;
        self.workers
            .iter()
            .map(|&pid| {
                let w = st.workers.iter().find(|w| w.pid == pid)?;
                Some(w.counters.connections)
            })
            .collect()
    }
}

#[cfg(test)]
impl Sample {
    pub fn for_test(memory: Vec<Option<Memory>>) -> Sample {
        Sample {
            at: 0,
            cpu: Vec::new(),
            memory,
            cores: Vec::new(),
        }
    }
}

/// Server CPU seconds between two samples, over the processes readable in both.
pub fn cpu_secs(from: &Sample, to: &Sample) -> f64 {
    let (user, system) = cpu_split(from, to);
    user + system
}

/// Server CPU seconds between two samples in user space and in the kernel, over the processes
/// readable in both.
pub fn cpu_split(from: &Sample, to: &Sample) -> (f64, f64) {
    let (mut user, mut system) = (0, 0);
    for (a, b) in from.cpu.iter().zip(&to.cpu) {
        if let (Some(a), Some(b)) = (a, b) {
            user += b.user.saturating_sub(a.user);
            system += b.system.saturating_sub(a.system);
        }
    }
    let hz = crate::sys::clock_ticks_per_sec() as f64;
    (user as f64 / hz, system as f64 / hz)
}

/// Processes readable in the first sample but not in the second: they ended (a worker was
/// replaced), and the CPU they spent in between is missing from [`cpu_secs`].
pub fn gone(from: &Sample, to: &Sample) -> usize {
    from.cpu
        .iter()
        .zip(&to.cpu)
        .filter(|(a, b)| a.is_some() && b.is_none())
        .count()
}

/// How busy each core was between two samples, 0 to 1.
pub fn cores_busy(from: &Sample, to: &Sample) -> Vec<f64> {
    from.cores
        .iter()
        .zip(&to.cores)
        .map(|(a, b)| {
            let total = b.1.saturating_sub(a.1);
            let busy = b.0.saturating_sub(a.0);
            if total == 0 {
                0.0
            } else {
                busy as f64 / total as f64
            }
        })
        .collect()
}

/// Busy (user, nice, system, irq, softirq, steal) and total ticks of each `cpuN` line of
/// `/proc/stat`.
fn core_ticks(stat: &str) -> Vec<(u64, u64)> {
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .map(|l| {
            let t: Vec<u64> = l
                .split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect();
            let at = |i: usize| t.get(i).copied().unwrap_or(0);
            let idle = at(3) + at(4);
            let total: u64 = t.iter().take(8).sum();
            (total - idle, total)
        })
        .collect()
}

/// Seconds between two samples.
pub fn window_secs(from: &Sample, to: &Sample) -> f64 {
    to.at.saturating_sub(from.at) as f64 / 1e9
}

/// `wsd -c FILE status --json`, run as this same program.
fn status(config: &Path) -> Result<Status, BenchError> {
    let exe = std::env::current_exe()
        .map_err(|e| BenchError::Setup("find this program to ask for status".into(), e))?;
    let out = Command::new(exe)
        .arg("-c")
        .arg(config)
        .args(["status", "--json"])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| BenchError::Setup("run wsd status".into(), e))?;
    let said = || String::from_utf8_lossy(&out.stderr).trim().to_string();
    if !out.status.success() {
        return Err(BenchError::Server(format!(
            "wsd -c {} status: {}",
            config.display(),
            said()
        )));
    }
    serde_json::from_slice(&out.stdout)
        .map_err(|e| BenchError::Server(format!("wsd -c {} status --json: {e}", config.display())))
}

fn cpu_ticks_of(pid: i32) -> Option<Ticks> {
    cpu_ticks(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

fn memory_of(pid: i32) -> Option<Memory> {
    rollup(&std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?)
}

/// utime and stime (fields 14 and 15) of a `/proc/<pid>/stat` line. The command name (field
/// 2) is in parentheses and may hold spaces, so fields are counted after its last `)`.
fn cpu_ticks(stat: &str) -> Option<Ticks> {
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let user: u64 = fields.next()?.parse().ok()?;
    let system: u64 = fields.next()?.parse().ok()?;
    Some(Ticks { user, system })
}

/// `Rss:` and `Pss:` of a `/proc/<pid>/smaps_rollup`.
fn rollup(text: &str) -> Option<Memory> {
    let field = |name: &str| -> Option<u64> {
        text.lines().find_map(|l| {
            let v = l.strip_prefix(name)?.trim().strip_suffix("kB")?;
            v.trim().parse().ok()
        })
    };
    Some(Memory {
        rss_kib: field("Rss:")?,
        pss_kib: field("Pss:")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_are_fields_14_and_15_whatever_the_command_name() {
        let stat = "4242 (wsd: worker (echo) #1) S 1 4242 4242 0 -1 4194560 1234 0 0 0 \
                    250 75 0 0 20 0 1 0 12345 1000000 500 18446744073709551615";
        assert_eq!(
            cpu_ticks(stat),
            Some(Ticks {
                user: 250,
                system: 75
            })
        );
        assert_eq!(cpu_ticks("4242 (x) S 1"), None);
        let mine = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(cpu_ticks(&mine).is_some());
    }

    #[test]
    fn rollup_gives_rss_and_pss() {
        let text = "55d0c0000000-7ffd00000000 ---p 00000000 00:00 0    [rollup]\n\
                    Rss:                4096 kB\nPss:                1536 kB\n\
                    Pss_Anon:           1024 kB\n";
        assert_eq!(
            rollup(text),
            Some(Memory {
                rss_kib: 4096,
                pss_kib: 1536
            })
        );
        assert_eq!(rollup("Rss: 1 kB\n"), None);
        assert!(memory_of(std::process::id() as i32).is_some_and(|m| m.rss_kib > 0));
    }

    #[test]
    fn core_ticks_are_busy_and_total_per_core() {
        let stat = "cpu  10 0 10 100 0 0 0 0 0 0\ncpu0 5 0 5 50 0 0 0 0 0 0\n\
                    cpu1 5 0 1 40 10 0 4 0 0 0\nintr 1 2\n";
        assert_eq!(core_ticks(stat), vec![(10, 60), (10, 60)]);
        let mine = std::fs::read_to_string("/proc/stat").unwrap();
        assert!(!core_ticks(&mine).is_empty());
    }

    #[test]
    fn cpu_seconds_count_only_processes_read_both_times() {
        let t = |user, system| Some(Ticks { user, system });
        let a = Sample {
            at: 0,
            cpu: vec![t(60, 40), t(50, 0), None],
            memory: Vec::new(),
            cores: Vec::new(),
        };
        let b = Sample {
            at: 2_000_000_000,
            cpu: vec![t(110, 190), None, t(900, 0)],
            memory: Vec::new(),
            cores: Vec::new(),
        };
        let hz = crate::sys::clock_ticks_per_sec() as f64;
        assert_eq!(cpu_secs(&a, &b), 200.0 / hz);
        assert_eq!(cpu_split(&a, &b), (50.0 / hz, 150.0 / hz));
        assert_eq!(gone(&a, &b), 1, "the second ended");
        assert_eq!(window_secs(&a, &b), 2.0);
    }
}
