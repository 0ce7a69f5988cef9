//! Where a guest's serial output goes, and a capture of it that tests can
//! wait on line by line.

use std::io::{self, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use base::sync::{self, lock};

/// The serial console of a VM.
pub enum Console {
    /// Guest output to this process's stdout, this process's stdin to the guest.
    Stdio,
    /// Guest output captured in memory (and echoed to stderr if asked).
    Log(SerialLog),
    /// Guest output to any writer; no input.
    Writer(Box<dyn Write + Send>),
}

#[derive(Default)]
struct LogState {
    bytes: Vec<u8>,
    echo: bool,
}

/// Captured serial output, shared between the VM and whoever watches it.
#[derive(Clone, Default)]
pub struct SerialLog {
    inner: Arc<(Mutex<LogState>, Condvar)>,
}

impl SerialLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// A log that also copies everything to stderr, to watch a test's guest.
    pub fn echoing() -> Self {
        let log = Self::default();
        log.state().echo = true;
        log
    }

    fn state(&self) -> MutexGuard<'_, LogState> {
        lock(&self.inner.0)
    }

    /// Everything the guest wrote so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.state().bytes).into_owned()
    }

    /// The complete lines so far, without line endings.
    pub fn lines(&self) -> Vec<String> {
        complete_lines(&self.state().bytes)
    }

    /// The first complete line containing `needle`, if any yet.
    pub fn find_line(&self, needle: &str) -> Option<String> {
        self.lines().into_iter().find(|l| l.contains(needle))
    }

    /// Waits up to `timeout` for a complete line containing `needle`, or for
    /// `stop()` to say there is no point waiting longer.
    pub fn wait_for_line_until(
        &self,
        needle: &str,
        timeout: Duration,
        mut stop: impl FnMut() -> bool,
    ) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut state = self.state();
        loop {
            if let Some(line) = complete_lines(&state.bytes)
                .into_iter()
                .find(|l| l.contains(needle))
            {
                return Some(line);
            }
            let now = Instant::now();
            if now >= deadline || stop() {
                return None;
            }
            // Wake at least every 50 ms to ask `stop`.
            let wait = (deadline - now).min(Duration::from_millis(50));
            state = sync::wait_timeout(&self.inner.1, state, wait).0;
        }
    }

    /// Waits up to `timeout` for a complete line containing `needle`.
    pub fn wait_for_line(&self, needle: &str, timeout: Duration) -> Option<String> {
        self.wait_for_line_until(needle, timeout, || false)
    }
}

fn complete_lines(bytes: &[u8]) -> Vec<String> {
    let end = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    String::from_utf8_lossy(&bytes[..end])
        .lines()
        .map(|l| l.trim_end_matches('\r').to_string())
        .collect()
}

impl Write for SerialLog {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.state();
        state.bytes.extend_from_slice(buf);
        if state.echo {
            // Echo is a debugging aid; a closed stderr must not stop the guest.
            let _ = io::stderr().write_all(buf);
        }
        drop(state);
        self.inner.1.notify_all();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_complete_lines_are_seen_and_carriage_returns_dropped() {
        let mut log = SerialLog::new();
        log.write_all(b"one\r\ntwo\npart").unwrap();
        assert_eq!(log.lines(), vec!["one", "two"]);
        assert_eq!(log.find_line("par"), None);
        log.write_all(b"ial\n").unwrap();
        assert_eq!(log.find_line("par").as_deref(), Some("partial"));
        assert_eq!(log.text(), "one\r\ntwo\npartial\n");
    }

    #[test]
    fn waiting_returns_when_the_line_arrives_from_another_thread() {
        let log = SerialLog::new();
        let mut writer = log.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            writer.write_all(b"ready: yes\n").unwrap();
        });
        let line = log.wait_for_line("ready", Duration::from_secs(10));
        assert_eq!(line.as_deref(), Some("ready: yes"));
        t.join().unwrap();
    }

    #[test]
    fn waiting_gives_up_at_the_timeout_or_when_told_to_stop() {
        let log = SerialLog::new();
        assert_eq!(log.wait_for_line("never", Duration::from_millis(30)), None);
        let start = Instant::now();
        assert_eq!(
            log.wait_for_line_until("never", Duration::from_secs(30), || true),
            None
        );
        assert!(start.elapsed() < Duration::from_secs(5));
    }
}
