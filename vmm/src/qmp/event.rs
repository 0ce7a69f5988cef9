//! Events: messages the server sends on its own, stamped with the wall
//! clock time they happened, e.g.
//! `{"timestamp": {"seconds": 1700000000, "microseconds": 12}, "event": "STOP"}`.
//! An event without data has no `data` member at all (QEMU's `STOP`,
//! `RESUME`), not an empty one.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::wire;

/// When an event happened: wall clock time since the Unix epoch, as QEMU
/// stamps events (clients compare it with their own clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timestamp {
    /// Whole seconds.
    pub seconds: u64,
    /// Microseconds within the second.
    pub microseconds: u32,
}

impl Timestamp {
    /// The time now.
    pub fn now() -> Self {
        // A clock set before 1970 reads as the epoch rather than failing.
        let since = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            seconds: since.as_secs(),
            microseconds: since.subsec_micros(),
        }
    }
}

/// One event, ready to be sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// The event's name, e.g. `JOB_STATUS_CHANGE`.
    pub name: String,
    /// Its `data` member, if it has one.
    pub data: Option<Value>,
    /// When it happened.
    pub timestamp: Timestamp,
}

impl Event {
    /// An event stamped now.
    pub fn new(name: &str, data: Option<Value>) -> Self {
        Self {
            name: name.to_owned(),
            data,
            timestamp: Timestamp::now(),
        }
    }

    /// The event as one message, members in QEMU's order.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = String::new();
        let Timestamp {
            seconds,
            microseconds,
        } = self.timestamp;
        out.push_str(&format!(
            "{{\"timestamp\": {{\"seconds\": {seconds}, \"microseconds\": {microseconds}}}, \"event\": "
        ));
        wire::write_str(&mut out, &self.name);
        if let Some(data) = &self.data {
            out.push_str(", ");
            wire::write_member(&mut out, "data", data);
        }
        out.push('}');
        wire::finish(out)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn shape_with_and_without_data() {
        let t = Timestamp {
            seconds: 1795652962,
            microseconds: 680104,
        };
        let mut e = Event {
            name: "JOB_STATUS_CHANGE".into(),
            data: Some(json!({"id": "j", "status": "created"})),
            timestamp: t,
        };
        assert_eq!(
            String::from_utf8(e.encode()).unwrap(),
            "{\"timestamp\": {\"seconds\": 1795652962, \"microseconds\": 680104}, \
             \"event\": \"JOB_STATUS_CHANGE\", \"data\": {\"id\": \"j\", \"status\": \"created\"}}\r\n"
        );
        e.name = "STOP".into();
        e.data = None;
        let v: Value = serde_json::from_slice(&e.encode()).unwrap();
        assert_eq!(
            v,
            json!({"timestamp": {"seconds": 1795652962, "microseconds": 680104}, "event": "STOP"})
        );
    }

    #[test]
    fn stamped_with_the_wall_clock() {
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let e = Event::new("STOP", None);
        let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let t = e.timestamp;
        assert!(t.microseconds < 1_000_000);
        let micros = u128::from(t.seconds) * 1_000_000 + u128::from(t.microseconds);
        assert!(before.as_micros() <= micros && micros <= after.as_micros());
    }
}
