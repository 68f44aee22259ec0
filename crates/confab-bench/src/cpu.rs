//! A process's CPU time from `/proc/PID/stat`, in user space and in the
//! kernel apart: under fan-out on loopback the kernel's share (the sends,
//! and the receiving side's TCP work they carry) is much the same for
//! every server, and what differs is the user space's.

use serde::Serialize;

/// CPU seconds a process has used so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Cpu {
    pub user: f64,
    pub kernel: f64,
}

impl Cpu {
    /// The CPU time of process `pid` (every thread of it); `None` if it
    /// cannot be read (gone, or not Linux).
    pub fn of(pid: u32) -> Option<Cpu> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        parse(&stat, hz as f64)
    }

    /// Of several processes (a cluster's nodes) together; `None` if any
    /// cannot be read.
    pub fn of_all(pids: &[u32]) -> Option<Cpu> {
        pids.iter().try_fold(Cpu::default(), |sum, &pid| {
            let cpu = Cpu::of(pid)?;
            Some(Cpu {
                user: sum.user + cpu.user,
                kernel: sum.kernel + cpu.kernel,
            })
        })
    }

    pub fn total(&self) -> f64 {
        self.user + self.kernel
    }

    /// What was used since `before`, per message of `messages`, in µs.
    pub fn per_message(&self, before: &Cpu, messages: u64) -> Option<CpuPerMessage> {
        if messages == 0 {
            return None;
        }
        let us = |now: f64, then: f64| (now - then).max(0.0) * 1e6 / messages as f64;
        Some(CpuPerMessage {
            user_us: us(self.user, before.user),
            kernel_us: us(self.kernel, before.kernel),
        })
    }
}

/// The server's CPU per message published (a message and its deliveries
/// to every member, its acknowledgement, its storage), in µs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CpuPerMessage {
    pub user_us: f64,
    pub kernel_us: f64,
}

impl std::fmt::Display for CpuPerMessage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:.1} µs ({:.1} user + {:.1} kernel)",
            self.user_us + self.kernel_us,
            self.user_us,
            self.kernel_us
        )
    }
}

/// Fields 14 and 15 of a `/proc/PID/stat` line (utime and stime, in clock
/// ticks of `hz` a second). The command name, field 2, is in parentheses
/// and may hold spaces and parentheses itself: the fields are counted
/// from its last `)`.
fn parse(stat: &str, hz: f64) -> Option<Cpu> {
    if hz <= 0.0 {
        return None;
    }
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let mut ticks = || fields.next()?.parse::<u64>().ok();
    let (user, kernel) = (ticks()?, ticks()?);
    Some(Cpu {
        user: user as f64 / hz,
        kernel: kernel as f64 / hz,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_and_kernel_time_are_read_past_any_command_name() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194304 900 0 0 0 \
                    576 404 0 0 20 0 7 0 1234 567 89";
        assert_eq!(
            parse(stat, 100.0),
            Some(Cpu {
                user: 5.76,
                kernel: 4.04
            })
        );
        assert_eq!(parse("4242 (short) S 1 2", 100.0), None, "too few fields");
        assert_eq!(parse("no parenthesis", 100.0), None);
        assert_eq!(parse(stat, 0.0), None);
    }

    #[test]
    fn cpu_per_message_is_what_was_used_over_the_messages() {
        let before = Cpu {
            user: 1.0,
            kernel: 2.0,
        };
        let after = Cpu {
            user: 1.5,
            kernel: 2.25,
        };
        let per = after.per_message(&before, 50_000).unwrap();
        assert!((per.user_us - 10.0).abs() < 1e-9, "{per:?}");
        assert!((per.kernel_us - 5.0).abs() < 1e-9, "{per:?}");
        assert_eq!(per.to_string(), "15.0 µs (10.0 user + 5.0 kernel)");
        assert_eq!(after.per_message(&before, 0), None);
    }

    #[test]
    fn this_process_can_be_read() {
        let cpu = Cpu::of(std::process::id()).expect("our own /proc entry");
        assert!(cpu.user >= 0.0 && cpu.kernel >= 0.0);
        assert_eq!(Cpu::of_all(&[]), Some(Cpu::default()));
    }
}
