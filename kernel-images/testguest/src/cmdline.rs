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

pub struct Options {
    pub exit: u8,
    pub idle: bool,
    pub crash: Option<Crash>,
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

/// Parses `cmdline`; calls `bad_value(key, value)` for each bad `exit=` or
/// `crash=` value (`key` is "exit" or "crash").
pub fn parse(cmdline: &[u8], mut bad_value: impl FnMut(&str, &[u8])) -> Options {
    let mut exit = 0u8;
    let mut idle = false;
    let mut crash = None;
    let mut bad = false;
    for token in cmdline.split(|b| b.is_ascii_whitespace()) {
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
        } else if token == b"idle" {
            idle = true;
        }
    }
    Options {
        exit: if bad { BAD_VALUE_STATUS } else { exit },
        idle,
        crash: if bad { None } else { crash },
    }
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
