//! The test guest's command-line options: space-separated tokens.
//! Unknown tokens are ignored (the VMM may append kernel parameters of
//! its own).
//!
//! - `exit=N`: the exit status, 0..=255 in decimal (default 0). A bad
//!   value (empty, not decimal digits, > 255) is reported and makes the
//!   status 1, whatever other `exit=` tokens say.
//! - `idle`: after the report lines, halt forever with interrupts off
//!   instead of exiting.
//! - `crash=triple-fault` / `crash=emulation`: after the report lines,
//!   stop the VM in that way (see crash.rs). A bad value is reported, makes
//!   the status 1 and cancels any crash.
//! - `blk=...`, `blk.<option>=...`, `virtio_mmio.device=...`: block
//!   devices and workloads (BlkOptions, README.md). Bad values are
//!   reported the same way (and also cancel any crash).

pub struct Options {
    pub exit: u8,
    pub idle: bool,
    pub crash: Option<Crash>,
    pub blk: BlkOptions,
}

/// A block workload (`blk=`), see blk_work.rs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Verify,
    Random,
    Discard,
    WriteZeroes,
    ReadOnly,
    Checksum,
    Malformed,
    GetId,
    Durable,
}

impl Work {
    pub const ALL: [(Work, &'static str); 9] = [
        (Work::Verify, "verify"),
        (Work::Random, "random"),
        (Work::Discard, "discard"),
        (Work::WriteZeroes, "writezeroes"),
        (Work::ReadOnly, "readonly"),
        (Work::Checksum, "checksum"),
        (Work::Malformed, "malformed"),
        (Work::GetId, "getid"),
        (Work::Durable, "durable"),
    ];
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(w, _)| *w == self).map_or("?", |(_, n)| n)
    }
}

/// A benchmark (`blk.bench=`), see bench.rs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Bench {
    RandRead4k,
    RandWrite4k,
    SeqRead128k,
    SeqWrite128k,
}

impl Bench {
    pub const ALL: [(Bench, &'static str); 4] = [
        (Bench::RandRead4k, "randread4k"),
        (Bench::RandWrite4k, "randwrite4k"),
        (Bench::SeqRead128k, "seqread128k"),
        (Bench::SeqWrite128k, "seqwrite128k"),
    ];
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(w, _)| *w == self).map_or("?", |(_, n)| n)
    }
}

/// A workload or benchmark and the device it runs on (0 = vda).
#[derive(Clone, Copy)]
pub struct Job<T> {
    pub what: T,
    pub dev: u8,
}

/// A `virtio_mmio.device=<size>@<addr>:<irq>` token.
#[derive(Clone, Copy)]
pub struct MmioDevice {
    pub size: u64,
    pub base: u64,
    /// Unused: the driver polls.
    #[allow(dead_code)]
    pub irq: u32,
}

pub const MAX_JOBS: usize = 16;
pub const MAX_DEVICES: usize = 8;

/// The `blk...` options and the virtio-mmio devices.
pub struct BlkOptions {
    pub jobs: [Option<Job<Work>>; MAX_JOBS],
    pub benches: [Option<Job<Bench>>; MAX_JOBS],
    pub devices: [Option<MmioDevice>; MAX_DEVICES],
    /// `blk.bytes=N`: limit verify/random/bench to the first N bytes.
    pub bytes: Option<u64>,
    /// `blk.qd=N`: requests in flight per queue (1..=128, default 32).
    pub qd: u32,
    /// `blk.queues=N`: queues used by random and the benchmarks (default 1).
    pub queues: u32,
    /// `blk.ops=N`: operations of random (default 1000) and the benchmarks.
    pub ops: Option<u64>,
    /// `blk.seconds=N`: benchmark duration when blk.ops is not given (default 3).
    pub seconds: u64,
    /// `blk.seed=N`: pattern seed (default: from the TSC).
    pub seed: Option<u64>,
    /// `blk.mode=kernel`: run the workloads in ring 0 instead of ring 3.
    pub kernel_mode: bool,
    /// `blk.event_idx=0`, `blk.indirect=0`: do not negotiate those.
    pub event_idx: bool,
    pub indirect: bool,
    /// `blk.timeout=N`: seconds one request may take (default 10).
    pub timeout_s: u64,
    /// `blk.notify=always`: notify the device on every kick that publishes
    /// requests (the benchmarks kick after each request), even when it
    /// suppresses notifications; `auto` (default): only when it asks.
    pub notify_always: bool,
    /// `blk.irq=on`: ask the device for an interrupt on every completion
    /// (used_event follows the used index; without EVENT_IDX,
    /// VIRTQ_AVAIL_F_NO_INTERRUPT stays clear). The guest still polls and
    /// never takes them (IF=0). `off` (default): interrupts suppressed.
    pub irq: bool,
}

impl BlkOptions {
    /// True if any block work was asked for.
    pub fn wanted(&self) -> bool {
        self.jobs.iter().any(|j| j.is_some()) || self.benches.iter().any(|j| j.is_some())
    }
}

/// How `crash=` asks the guest to stop the VM.
#[derive(Clone, Copy)]
pub enum Crash {
    /// `crash=triple-fault`: an exception with no usable IDT.
    TripleFault,
    /// `crash=emulation`: an instruction PVM's emulator lacks.
    Emulation,
}

impl Crash {
    /// The value as written on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Crash::TripleFault => "triple-fault",
            Crash::Emulation => "emulation",
        }
    }
}

/// Status used when an option has a bad value.
pub const BAD_VALUE_STATUS: u8 = 1;

/// Parses `cmdline`; calls `bad_value(key, value)` for each bad value
/// (`key` is the token's key: "exit", "crash", "blk.qd", ...).
pub fn parse(cmdline: &[u8], mut bad_value: impl FnMut(&str, &[u8])) -> Options {
    let mut exit = 0u8;
    let mut idle = false;
    let mut crash = None;
    let mut bad = false;
    let mut blk = BlkOptions {
        jobs: [None; MAX_JOBS],
        benches: [None; MAX_JOBS],
        devices: [None; MAX_DEVICES],
        bytes: None,
        qd: 32,
        queues: 1,
        ops: None,
        seconds: 3,
        seed: None,
        kernel_mode: false,
        event_idx: true,
        indirect: true,
        timeout_s: 10,
        notify_always: false,
        irq: false,
    };
    let (mut njobs, mut nbench, mut ndev) = (0, 0, 0);
    for token in cmdline.split(|b| b.is_ascii_whitespace()) {
        let Some(eq) = token.iter().position(|&b| b == b'=') else {
            if token == b"idle" {
                idle = true;
            }
            continue;
        };
        let (key, value) = (&token[..eq], &token[eq + 1..]);
        let key_str = core::str::from_utf8(key).unwrap_or("?");
        let mut ok = true;
        match key {
            // A list is taken whole or not at all.
            b"blk" => ok = job_list(value, &Work::ALL, &mut blk.jobs, &mut njobs),
            b"blk.bench" => ok = job_list(value, &Bench::ALL, &mut blk.benches, &mut nbench),
            b"blk.bytes" => match parse_size(value) {
                Some(v) if v > 0 => blk.bytes = Some(v),
                _ => ok = false,
            },
            b"blk.qd" => match parse_size(value) {
                Some(v @ 1..=128) => blk.qd = v as u32,
                _ => ok = false,
            },
            b"blk.queues" => match parse_size(value) {
                Some(v @ 1..=8) => blk.queues = v as u32,
                _ => ok = false,
            },
            b"blk.ops" => match parse_size(value) {
                Some(v) if v > 0 => blk.ops = Some(v),
                _ => ok = false,
            },
            b"blk.seconds" => match parse_size(value) {
                Some(v @ 1..=3600) => blk.seconds = v,
                _ => ok = false,
            },
            b"blk.timeout" => match parse_size(value) {
                Some(v @ 1..=3600) => blk.timeout_s = v,
                _ => ok = false,
            },
            b"blk.seed" => match parse_size(value) {
                Some(v) => blk.seed = Some(v),
                _ => ok = false,
            },
            b"blk.mode" => match value {
                b"user" => blk.kernel_mode = false,
                b"kernel" => blk.kernel_mode = true,
                _ => ok = false,
            },
            b"blk.notify" => match value {
                b"auto" => blk.notify_always = false,
                b"always" => blk.notify_always = true,
                _ => ok = false,
            },
            b"blk.irq" => match value {
                b"off" => blk.irq = false,
                b"on" => blk.irq = true,
                _ => ok = false,
            },
            b"blk.event_idx" | b"blk.indirect" => {
                let v = match value {
                    b"0" => false,
                    b"1" => true,
                    _ => {
                        ok = false;
                        true
                    }
                };
                if key == b"blk.event_idx" {
                    blk.event_idx = v;
                } else {
                    blk.indirect = v;
                }
            }
            b"virtio_mmio.device" => match mmio_device(value) {
                Some(d) if ndev < MAX_DEVICES => {
                    blk.devices[ndev] = Some(d);
                    ndev += 1;
                }
                _ => ok = false,
            },
            _ => {}
        }
        if !ok {
            bad_value(key_str, value);
            bad = true;
            continue;
        }
        if let Some(value) = token.strip_prefix(b"exit=") {
            match parse_u8(value) {
                Some(v) => exit = v,
                None => {
                    bad_value("exit", value);
                    bad = true;
                }
            }
        } else if let Some(value) = token.strip_prefix(b"crash=") {
            match value {
                b"triple-fault" => crash = Some(Crash::TripleFault),
                b"emulation" => crash = Some(Crash::Emulation),
                _ => {
                    bad_value("crash", value);
                    bad = true;
                }
            }
        }
    }
    Options {
        exit: if bad { BAD_VALUE_STATUS } else { exit },
        idle,
        crash: if bad { None } else { crash },
        blk,
    }
}

/// A comma-separated list of jobs, appended to `jobs` only if every item
/// is valid and they fit.
fn job_list<T: Copy>(value: &[u8], names: &[(T, &str)], jobs: &mut [Option<Job<T>>], n: &mut usize) -> bool {
    let mut k = *n;
    let mut new = [None; MAX_JOBS];
    for item in value.split(|&b| b == b',') {
        match job(item, names) {
            Some(j) if k < jobs.len() => {
                new[k - *n] = Some(j);
                k += 1;
            }
            _ => return false,
        }
    }
    jobs[*n..k].copy_from_slice(&new[..k - *n]);
    *n = k;
    true
}

/// `name` or `name@vdX` (X = a..h).
fn job<T: Copy>(item: &[u8], names: &[(T, &str)]) -> Option<Job<T>> {
    let (name, dev) = match item.iter().position(|&b| b == b'@') {
        Some(at) => (&item[..at], &item[at + 1..]),
        None => (item, &b"vda"[..]),
    };
    let dev = match dev {
        [b'v', b'd', c @ b'a'..=b'h'] => c - b'a',
        _ => return None,
    };
    let what = names.iter().find(|(_, n)| n.as_bytes() == name)?.0;
    Some(Job { what, dev })
}

/// `<size>@<addr>:<irq>[:<id>]` as Linux's virtio_mmio module parses it.
fn mmio_device(v: &[u8]) -> Option<MmioDevice> {
    let at = v.iter().position(|&b| b == b'@')?;
    let size = parse_size(&v[..at])?;
    let rest = &v[at + 1..];
    let colon = rest.iter().position(|&b| b == b':')?;
    let base = parse_size(&rest[..colon])?;
    let irq_part = &rest[colon + 1..];
    let irq_end = irq_part.iter().position(|&b| b == b':').unwrap_or(irq_part.len());
    let irq = parse_size(&irq_part[..irq_end])?;
    if size == 0 || base == 0 || base & 3 != 0 || irq > u32::MAX as u64 {
        return None;
    }
    Some(MmioDevice { size, base, irq: irq as u32 })
}

/// Decimal or 0x-hex, with an optional K/M/G suffix (binary, like Linux's
/// memparse).
pub fn parse_size(s: &[u8]) -> Option<u64> {
    let (digits, shift) = match s.last()? {
        b'k' | b'K' => (&s[..s.len() - 1], 10),
        b'm' | b'M' => (&s[..s.len() - 1], 20),
        b'g' | b'G' => (&s[..s.len() - 1], 30),
        _ => (s, 0),
    };
    let (digits, radix) = match digits {
        [b'0', b'x' | b'X', rest @ ..] => (rest, 16),
        _ => (digits, 10),
    };
    if digits.is_empty() {
        return None;
    }
    let mut v: u64 = 0;
    for &c in digits {
        let d = (c as char).to_digit(radix)? as u64;
        v = v.checked_mul(radix as u64)?.checked_add(d)?;
    }
    v.checked_mul(1 << shift)
}

/// Decimal 0..=255 (leading zeros allowed); None for anything else.
fn parse_u8(s: &[u8]) -> Option<u8> {
    if s.is_empty() {
        return None;
    }
    let mut v: u32 = 0;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (c - b'0') as u32;
        if v > 255 {
            return None;
        }
    }
    Some(v as u8)
}
