//! A small QMP client for the integration tests: connect, negotiate,
//! run commands, and collect the events that arrive meanwhile.

use std::io::{BufRead, BufReader, ErrorKind, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One QMP connection.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// The greeting the server sent.
    pub greeting: Value,
    /// Events received and not yet taken.
    pub events: Vec<Value>,
    /// What a read that timed out had of its line so far.
    partial: String,
    /// Every event received, taken or not, in order.
    pub history: Vec<Value>,
}

/// A QMP error reply: class and description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QmpErr {
    pub class: String,
    pub desc: String,
}

impl Qmp {
    /// Connects to `path` (waiting up to 10 s for the socket to appear) and
    /// negotiates capabilities.
    pub fn connect(path: &Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot connect to QMP at {}: {e}", path.display()),
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let writer = stream.try_clone().unwrap();
        let mut qmp = Self {
            reader: BufReader::new(stream),
            writer,
            greeting: Value::Null,
            events: Vec::new(),
            partial: String::new(),
            history: Vec::new(),
        };
        qmp.greeting = qmp.read();
        assert!(qmp.greeting.get("QMP").is_some(), "{}", qmp.greeting);
        qmp.ok("qmp_capabilities", json!({}));
        qmp
    }

    fn read(&mut self) -> Value {
        let n = self.reader.read_line(&mut self.partial).expect("QMP read");
        assert!(n > 0, "the QMP server closed the connection");
        let line = std::mem::take(&mut self.partial);
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}"))
    }

    /// The next message, or None if none came by `deadline`.
    fn read_until(&mut self, deadline: Instant) -> Option<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        let stream = self.reader.get_ref();
        stream.set_read_timeout(Some(left)).unwrap();
        // A timed-out read keeps what it had of the line in `partial`,
        // so the next read carries on from there.
        let got = match self.reader.read_line(&mut self.partial) {
            Ok(0) => panic!("the QMP server closed the connection"),
            Ok(_) => true,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => false,
            Err(e) => panic!("QMP read: {e}"),
        };
        self.reader
            .get_ref()
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        if !got || !self.partial.ends_with('\n') {
            return None;
        }
        let line = std::mem::take(&mut self.partial);
        Some(serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad QMP line {line:?}: {e}")))
    }

    /// Reads events into `events` until `done(&events)` holds; false if it
    /// did not within `timeout`. Nothing is taken out of `events`.
    pub fn events_until(&mut self, timeout: Duration, done: impl Fn(&[Value]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while !done(&self.events) {
            match self.read_until(deadline) {
                Some(v) => {
                    assert!(v.get("event").is_some(), "unexpected reply {v}");
                    self.history.push(v.clone());
                    self.events.push(v);
                }
                None if Instant::now() >= deadline => return false,
                None => {}
            }
        }
        true
    }

    /// Sends raw bytes (for malformed-input tests).
    pub fn send_raw(&mut self, bytes: &[u8]) {
        self.writer.write_all(bytes).unwrap();
    }

    /// Reads the next reply, keeping events that come first.
    pub fn reply(&mut self) -> Value {
        loop {
            let v = self.read();
            if v.get("event").is_some() {
                self.history.push(v.clone());
                self.events.push(v);
            } else {
                return v;
            }
        }
    }

    /// Runs a command; its `return` value or its error.
    pub fn execute(&mut self, command: &str, args: Value) -> Result<Value, QmpErr> {
        let msg = json!({"execute": command, "arguments": args});
        self.send_raw(msg.to_string().as_bytes());
        let reply = self.reply();
        if let Some(ret) = reply.get("return") {
            return Ok(ret.clone());
        }
        let err = &reply["error"];
        assert!(err.is_object(), "neither return nor error: {reply}");
        Err(QmpErr {
            class: err["class"].as_str().unwrap().to_string(),
            desc: err["desc"].as_str().unwrap().to_string(),
        })
    }

    /// Runs a command that must succeed.
    pub fn ok(&mut self, command: &str, args: Value) -> Value {
        self.execute(command, args.clone())
            .unwrap_or_else(|e| panic!("{command} {args} failed: {e:?}"))
    }

    /// `block-export-del` of export `id` in the safe mode, once its clients
    /// are seen gone: a client process that has exited reaches the
    /// server's connection thread a little later, and until then the
    /// export is (rightly) still in use.
    pub fn delete_export(&mut self, id: &str) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.execute("block-export-del", json!({ "id": id })) {
                Ok(_) => return,
                Err(e) if e.desc.ends_with("still in use") && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("block-export-del {id} failed: {e:?}"),
            }
        }
    }

    /// Runs a command that must fail; its error.
    pub fn err(&mut self, command: &str, args: Value) -> QmpErr {
        match self.execute(command, args.clone()) {
            Ok(v) => panic!("{command} {args} succeeded with {v}, expected an error"),
            Err(e) => e,
        }
    }

    /// Waits for an event named `name` whose data satisfies `matches`;
    /// earlier events stay in `events`.
    pub fn wait_event(
        &mut self,
        name: &str,
        timeout: Duration,
        matches: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(i) = self
                .events
                .iter()
                .position(|e| e["event"] == name && matches(&e["data"]))
            {
                return self.events.remove(i);
            }
            assert!(
                Instant::now() < deadline,
                "no {name} event within {timeout:?}; events: {:?}",
                self.events
            );
            let v = self.read();
            assert!(v.get("event").is_some(), "unexpected reply {v}");
            self.history.push(v.clone());
            self.events.push(v);
        }
    }

    /// The `status` of every JOB_STATUS_CHANGE for `job` received so far, in order.
    pub fn job_statuses(&self, job: &str) -> Vec<String> {
        self.history
            .iter()
            .filter(|e| e["event"] == "JOB_STATUS_CHANGE" && e["data"]["id"] == job)
            .map(|e| e["data"]["status"].as_str().unwrap().to_string())
            .collect()
    }
}
