//! Installing a seccomp filter on the calling thread, and the one line a
//! process prints before it ends when a thread makes a system call its
//! filter traps.
//!
//! A filter whose default action is `SECCOMP_RET_TRAP` makes the kernel
//! send the offending thread `SIGSYS`; [`report_trapped_calls`] installs a
//! handler that writes `vmm: thread 'NAME' made system call NAME (N), which
//! its seccomp filter does not allow` to stderr with write(2) alone and
//! ends the process with [`TRAPPED_EXIT`]. (`SECCOMP_RET_KILL_PROCESS`
//! would end it without a word.)

mod names;

use std::cell::Cell;
use std::io;
use std::sync::Once;

pub use seccompiler::BpfProgram;

/// The exit status of a process one of whose threads made a trapped call:
/// 128 + SIGSYS, what a shell shows for a process SIGSYS killed.
pub const TRAPPED_EXIT: i32 = 128 + libc::SIGSYS;

/// The most bytes of a thread's name a report shows, as the kernel's
/// `comm` (15 and a NUL).
const NAME_LEN: usize = 16;

/// Why a filter could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The kernel refused the filter, or `no_new_privs`.
    #[error("cannot install the seccomp filter of thread '{thread}': {source}")]
    Install {
        /// The thread's name.
        thread: String,
        /// What seccompiler said.
        source: seccompiler::Error,
    },
    /// sigaction(2) failed.
    #[error("cannot install the handler that reports trapped system calls: {0}")]
    Handler(io::Error),
}

thread_local! {
    /// This thread's name for the report, kept where a signal handler can
    /// read it: a const-initialised cell with no destructor needs no
    /// allocation or lazy set-up on access.
    static REPORT_NAME: Cell<[u8; NAME_LEN]> = const { Cell::new([0; NAME_LEN]) };
}

/// Installs `filter` on the calling thread, named `thread` in reports.
/// Threads it starts afterwards inherit the filter.
pub fn install(thread: &str, filter: &BpfProgram) -> Result<(), SeccompError> {
    set_report_name(thread);
    seccompiler::apply_filter(filter).map_err(|source| SeccompError::Install {
        thread: thread.to_string(),
        source,
    })
}

/// The name a report gives the calling thread; cut to 15 bytes.
pub fn set_report_name(name: &str) {
    let mut buf = [0u8; NAME_LEN];
    let n = name.len().min(NAME_LEN - 1);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    REPORT_NAME.with(|c| c.set(buf));
}

/// Installs, once per process, the `SIGSYS` handler that reports a
/// trapped system call and ends the process.
pub fn report_trapped_calls() -> Result<(), SeccompError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask"
        // value; the handler has the SA_SIGINFO signature and stays valid
        // for the life of the process.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigsys as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            result = Err(SeccompError::Handler(io::Error::last_os_error()));
        }
    });
    result
}

/// The `SIGSYS` handler. Only async-signal-safe work: it reads the
/// thread's name from its cell and the call's number from the siginfo,
/// formats into a stack buffer, then write(2) and _exit(2), both of which
/// every filter allows.
extern "C" fn on_sigsys(_signo: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    let mut line = Line::default();
    line.push(b"vmm: thread '");
    let name = REPORT_NAME.with(|c| c.get());
    let len = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    line.push(if len == 0 { b"?" } else { &name[..len] });
    line.push(b"' made system call ");
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let number = unsafe { syscall_number(info) };
    match usize::try_from(number)
        .ok()
        .and_then(|n| names::NAMES.get(n))
    {
        Some(name) if !name.is_empty() => {
            line.push(name.as_bytes());
            line.push(b" (");
            line.push_number(number);
            line.push(b")");
        }
        _ => line.push_number(number),
    }
    line.push(b", which its seccomp filter does not allow\n");
    // SAFETY: write(2) from a buffer we own, then _exit(2): both are
    // async-signal-safe, and nothing runs after _exit.
    unsafe {
        libc::write(2, line.buf.as_ptr().cast(), line.len);
        libc::_exit(TRAPPED_EXIT);
    }
}

/// The number of the system call that raised `SIGSYS`.
///
/// # Safety
/// `info` must point to a siginfo the kernel filled for `SIGSYS`.
unsafe fn syscall_number(info: *const libc::siginfo_t) -> i32 {
    // For SIGSYS the kernel's union holds `void *_call_addr; int _syscall;
    // unsigned int _arch`, after si_signo, si_errno, si_code and the
    // padding that aligns the union to 8 bytes; the libc crate names no
    // accessor for it.
    #[repr(C)]
    struct SigsysInfo {
        signo: i32,
        errno: i32,
        code: i32,
        _pad: i32,
        call_addr: *mut libc::c_void,
        syscall: i32,
        arch: u32,
    }
    // SAFETY: the caller passes a valid SIGSYS siginfo, which is at least
    // as large as this prefix of it.
    unsafe { (*info.cast::<SigsysInfo>()).syscall }
}

/// A fixed buffer to build the report in without allocating.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self {
            buf: [0; 160],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i32) {
        let mut digits = [0u8; 11];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        if n < 0 {
            self.push(b"-");
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_names_format_without_allocating() {
        let mut line = Line::default();
        line.push_number(0);
        line.push(b" ");
        line.push_number(-12);
        line.push(b" ");
        line.push_number(i32::MAX);
        assert_eq!(&line.buf[..line.len], b"0 -12 2147483647");
        assert_eq!(names::NAMES[0], "read");
        assert_eq!(
            names::NAMES[libc::SYS_io_uring_enter as usize],
            "io_uring_enter"
        );
        assert_eq!(names::NAMES[libc::SYS_clone3 as usize], "clone3");
    }

    #[test]
    fn a_long_report_is_cut_not_overrun() {
        let mut line = Line::default();
        line.push(&[b'x'; 200]);
        assert_eq!(line.len, 160);
    }
}
