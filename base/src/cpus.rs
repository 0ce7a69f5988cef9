//! Host CPU lists (`0-3,6`, as taskset writes them) and pinning a thread
//! to one.
//!
//! Where a thread runs can decide a disk's speed more than anything the
//! VMM does: a host filesystem may finish each direct write on a worker of
//! the CPU that took the disk's interrupt, and that worker preempts
//! whatever runs there. The operator knows the host; `--vcpu-affinity` and
//! a disk's `dataplane-cpus=` let them say where each thread goes.

use std::collections::BTreeSet;
use std::fmt;
use std::io;

use nix::sched::{sched_getaffinity, sched_setaffinity, CpuSet};
use nix::unistd::Pid;

/// A non-empty set of host CPU numbers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuList(BTreeSet<usize>);

/// Why a CPU list is not usable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuListError {
    /// Nothing between the separators.
    #[error("a CPU list names at least one CPU (e.g. 0-3{0}6)")]
    Empty(char),
    /// A part that is neither a number nor a range.
    #[error("'{0}' is neither a CPU number nor a range like 2-5")]
    Malformed(String),
    /// A range whose end comes before its start.
    #[error("the range '{0}' ends before it starts")]
    Reversed(String),
    /// A CPU number past what Linux's affinity masks hold.
    #[error("CPU {0} is past the highest CPU number this host can name ({max})", max = CpuList::LIMIT - 1)]
    TooLarge(String),
    /// CPUs this process may not run on (offline, absent, or outside its
    /// cgroup or its own affinity).
    #[error("CPU {named} is not one this process may run on (it may run on {allowed})")]
    NotAllowed {
        /// The CPUs named that are not allowed.
        named: String,
        /// What the process may run on.
        allowed: String,
    },
    /// The process's own affinity could not be read.
    #[error("cannot read which CPUs this process may run on: {0}")]
    Query(String),
}

impl CpuList {
    /// How many CPU numbers an affinity mask holds.
    pub const LIMIT: usize = 1024;

    /// Parses `0-3,6`-style text, with `separator` between the parts (a
    /// `--disk` value cannot hold a comma, so it uses `:`).
    pub fn parse(text: &str, separator: char) -> Result<Self, CpuListError> {
        let mut cpus = BTreeSet::new();
        for part in text.split(separator) {
            if part.is_empty() {
                return Err(CpuListError::Empty(separator));
            }
            let number = |s: &str| -> Result<usize, CpuListError> {
                if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(CpuListError::Malformed(part.into()));
                }
                match s.parse::<usize>() {
                    Ok(n) if n < Self::LIMIT => Ok(n),
                    _ => Err(CpuListError::TooLarge(s.into())),
                }
            };
            let (first, last) = match part.split_once('-') {
                Some((a, b)) => (number(a)?, number(b)?),
                None => {
                    let n = number(part)?;
                    (n, n)
                }
            };
            if last < first {
                return Err(CpuListError::Reversed(part.into()));
            }
            cpus.extend(first..=last);
        }
        Ok(CpuList(cpus))
    }

    /// The CPUs the calling thread may run on now.
    pub fn allowed() -> Result<Self, CpuListError> {
        let set = sched_getaffinity(Pid::from_raw(0))
            .map_err(|e| CpuListError::Query(io::Error::from(e).to_string()))?;
        let cpus: BTreeSet<usize> = (0..Self::LIMIT)
            .filter(|&c| set.is_set(c).unwrap_or(false))
            .collect();
        Ok(CpuList(cpus))
    }

    /// Every CPU here is one the calling thread may run on: checked before
    /// a VM starts, so that a typo fails the start instead of a thread.
    pub fn check_allowed(&self) -> Result<(), CpuListError> {
        let allowed = Self::allowed()?;
        let outside: BTreeSet<usize> = self.0.difference(&allowed.0).copied().collect();
        if outside.is_empty() {
            return Ok(());
        }
        Err(CpuListError::NotAllowed {
            named: CpuList(outside).to_string(),
            allowed: allowed.to_string(),
        })
    }

    /// Keeps the calling thread on these CPUs from now on.
    pub fn pin_current_thread(&self) -> io::Result<()> {
        let mut set = CpuSet::new();
        for &cpu in &self.0 {
            set.set(cpu).map_err(io::Error::from)?;
        }
        sched_setaffinity(Pid::from_raw(0), &set).map_err(io::Error::from)
    }

    /// Whether `cpu` is in the list.
    pub fn contains(&self, cpu: usize) -> bool {
        self.0.contains(&cpu)
    }

    /// The CPU numbers, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().copied()
    }
}

/// Writes the list with commas and ranges (`0-3,6`), as
/// `/proc/<pid>/status`'s `Cpus_allowed_list` does.
impl fmt::Display for CpuList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut cpus = self.0.iter().copied().peekable();
        let mut first = true;
        while let Some(start) = cpus.next() {
            let mut end = start;
            while cpus.peek() == Some(&(end + 1)) {
                end = cpus.next().unwrap_or(end);
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if end == start {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn list(s: &str) -> Vec<usize> {
        CpuList::parse(s, ',').unwrap().iter().collect()
    }

    #[test]
    fn lists_take_numbers_and_ranges_in_any_order() {
        assert_eq!(list("3"), [3]);
        assert_eq!(list("0-3,6"), [0, 1, 2, 3, 6]);
        assert_eq!(list("6,0-1,1"), [0, 1, 6]);
        assert_eq!(
            CpuList::parse("0-1:4", ':')
                .unwrap()
                .iter()
                .collect::<Vec<_>>(),
            [0, 1, 4]
        );
    }

    #[test]
    fn a_list_prints_as_the_kernel_prints_one() {
        for s in ["0", "0-3,6", "1,3,5-7", "1023"] {
            assert_eq!(CpuList::parse(s, ',').unwrap().to_string(), s);
        }
    }

    #[test]
    fn malformed_lists_say_what_is_wrong() {
        let err = |s: &str| CpuList::parse(s, ',').unwrap_err();
        assert_eq!(err(""), CpuListError::Empty(','));
        assert_eq!(err("0,,1"), CpuListError::Empty(','));
        assert_eq!(err("a"), CpuListError::Malformed("a".into()));
        assert_eq!(err("-1"), CpuListError::Malformed("-1".into()));
        assert_eq!(err("1-"), CpuListError::Malformed("1-".into()));
        assert_eq!(err("1-2-3"), CpuListError::Malformed("1-2-3".into()));
        assert_eq!(err("+1"), CpuListError::Malformed("+1".into()));
        assert_eq!(err("5-2"), CpuListError::Reversed("5-2".into()));
        assert_eq!(err("1024"), CpuListError::TooLarge("1024".into()));
        assert_eq!(
            err("99999999999999999999999"),
            CpuListError::TooLarge("99999999999999999999999".into())
        );
        // The disk option's separator is ':'; a comma there is malformed.
        assert_eq!(
            CpuList::parse("0,1", ':').unwrap_err(),
            CpuListError::Malformed("0,1".into())
        );
    }

    #[test]
    fn only_cpus_the_process_may_run_on_pass_the_check() {
        let allowed = CpuList::allowed().unwrap();
        allowed.check_allowed().unwrap();
        let err = CpuList::parse("1023", ',').unwrap().check_allowed();
        if !allowed.contains(1023) {
            let msg = err.unwrap_err().to_string();
            assert!(msg.starts_with("CPU 1023 is not one this process may run on (it may run on "));
            assert!(msg.ends_with(&format!("{allowed})")), "{msg}");
        }
    }

    #[test]
    fn a_pinned_thread_runs_only_where_it_was_pinned() {
        let allowed = CpuList::allowed().unwrap();
        let last = allowed.iter().last().unwrap();
        let seen = std::thread::spawn(move || {
            let one = CpuList::parse(&last.to_string(), ',').unwrap();
            one.pin_current_thread().unwrap();
            (CpuList::allowed().unwrap(), one)
        })
        .join()
        .unwrap();
        assert_eq!(seen.0, seen.1);
        // The pin is the thread's own: this thread keeps what it had.
        assert_eq!(CpuList::allowed().unwrap(), allowed);
    }
}
