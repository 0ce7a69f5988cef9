//! One QMP connection as a state machine, with no socket: bytes from the
//! client go in, reply bytes come out. The server owns the sockets; this
//! owns the rules, so they can be tested a byte at a time.
//!
//! ```text
//!  connect ──► greeting ──► negotiation ──qmp_capabilities──► commands
//!                           (only qmp_capabilities;            (and events)
//!                            no events)
//! ```
//!
//! Every input value gets exactly one reply, in order: `{"return": ...}`
//! or `{"error": ...}`, carrying the request's `id` if it had one (any
//! JSON value, echoed untouched). Input that is not JSON, or not a valid
//! request, gets an error and the connection carries on with the next
//! value (see [`super::split`] for where a bad value ends).

use serde_json::{json, Map, Value};

use super::args::Args;
use super::error::QmpError;
use super::split::{Piece, Splitter};
use super::{wire, Commands};

/// The largest JSON value a client may send, in bytes: far above any
/// real command, low enough that a client cannot make us hold much.
pub const MAX_INPUT: usize = 1 << 20;

/// The command that ends negotiation.
const CAPABILITIES: &str = "qmp_capabilities";
/// The command the protocol answers itself, from the command list.
const QUERY_COMMANDS: &str = "query-commands";

/// What the protocol made of one input value.
#[derive(Debug)]
pub enum Next {
    /// The protocol answered it itself (an error, negotiation,
    /// `query-commands`): this is the reply.
    Reply(Vec<u8>),
    /// A command to run; its reply is [`Request::reply`] of the result.
    Run(Request),
}

/// A valid command from a negotiated client, not yet run.
#[derive(Debug)]
pub struct Request {
    /// The command's name, one of [`Commands::names`].
    pub name: String,
    /// Its arguments (empty when absent).
    pub args: Map<String, Value>,
    id: Option<Value>,
}

impl Request {
    /// Runs this request through `commands`, handing over its arguments;
    /// the reply.
    pub fn run(mut self, commands: &dyn Commands) -> Vec<u8> {
        let args = std::mem::take(&mut self.args);
        let result = commands.execute(&self.name, args);
        self.reply(result)
    }

    /// The reply to this request for `result`, carrying its `id`.
    pub fn reply(&self, result: Result<Value, QmpError>) -> Vec<u8> {
        match result {
            Ok(ret) => return_reply(self.id.as_ref(), &ret),
            Err(e) => error_reply(self.id.as_ref(), &e),
        }
    }
}

/// The state of one client's connection.
#[derive(Debug)]
pub struct Session {
    splitter: Splitter,
    /// Bytes received and not yet looked at.
    input: Vec<u8>,
    /// How much of `input` the splitter has used.
    used: usize,
    negotiated: bool,
}

impl Default for Session {
    fn default() -> Self {
        Self::new()
    }
}

impl Session {
    /// A new connection, before its greeting.
    pub fn new() -> Self {
        Self {
            splitter: Splitter::new(MAX_INPUT),
            input: Vec::new(),
            used: 0,
            negotiated: false,
        }
    }

    /// The first message on every connection: who we are (our own name and
    /// version; we are not QEMU) and the capabilities on offer (none: no
    /// out-of-band execution).
    pub fn greeting() -> Vec<u8> {
        Self::greeting_for(env!("CARGO_PKG_VERSION"))
    }

    /// The greeting of a build whose Cargo version is `version`.
    pub(crate) fn greeting_for(version: &str) -> Vec<u8> {
        let (major, minor, micro) = version_triple(version);
        let mut out = format!(
            "{{\"QMP\": {{\"version\": {{\"qemu\": {{\"micro\": {micro}, \"minor\": {minor}, \"major\": {major}}}, \"package\": "
        );
        wire::write_str(&mut out, &format!("vmm {version}"));
        out.push_str("}, \"capabilities\": []}}");
        wire::finish(out)
    }

    /// Whether `qmp_capabilities` has succeeded: only then may events be
    /// sent (a client in negotiation must see nothing but replies).
    pub fn accepts_events(&self) -> bool {
        self.negotiated
    }

    /// Whether the client has sent part of a value and not its end (what
    /// is lost if it goes away now).
    pub fn is_mid_value(&self) -> bool {
        self.used < self.input.len() || self.splitter.is_mid_text()
    }

    /// Takes bytes from the client; [`Session::next_reply`] answers them.
    pub fn push_input(&mut self, bytes: &[u8]) {
        if self.used == self.input.len() {
            self.input.clear();
            self.used = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    /// Handles the next complete value received, running it through
    /// `commands` if it is a command, and returns its reply; `None` once
    /// the input holds no complete value.
    pub fn next_reply(&mut self, commands: &dyn Commands) -> Option<Vec<u8>> {
        Some(match self.next(commands)? {
            Next::Reply(reply) => reply,
            Next::Run(request) => request.run(commands),
        })
    }

    /// Handles the next complete value received as far as the protocol
    /// can: a reply, or a command for `commands` to run, wherever the
    /// caller chooses; `None` once the input holds no complete value.
    pub fn next(&mut self, commands: &dyn Commands) -> Option<Next> {
        let (used, piece) = self.splitter.next(&self.input[self.used..]);
        self.used += used;
        if self.used == self.input.len() {
            self.input.clear();
            self.used = 0;
        }
        Some(match piece? {
            Piece::TooLong => Next::Reply(error_reply(
                None,
                &QmpError::generic(format!(
                    "JSON parse error, input longer than {MAX_INPUT} bytes"
                )),
            )),
            Piece::Text(text) => self.handle_text(&text, commands),
        })
    }

    /// Takes `bytes` and returns every reply they complete, in order.
    pub fn feed(&mut self, bytes: &[u8], commands: &dyn Commands) -> Vec<u8> {
        self.push_input(bytes);
        let mut out = Vec::new();
        while let Some(reply) = self.next_reply(commands) {
            out.extend(reply);
        }
        out
    }

    fn handle_text(&mut self, text: &[u8], commands: &dyn Commands) -> Next {
        let request = match serde_json::from_slice::<Value>(text) {
            Ok(Value::Object(request)) => request,
            Ok(_) => {
                return Next::Reply(error_reply(
                    None,
                    &QmpError::generic("QMP input must be a JSON object"),
                ))
            }
            Err(e) => {
                return Next::Reply(error_reply(
                    None,
                    &QmpError::generic(format!("JSON parse error, {e}")),
                ))
            }
        };
        let id = request.get("id").cloned();
        let reply = |result: Result<Value, QmpError>| match result {
            Ok(ret) => return_reply(id.as_ref(), &ret),
            Err(e) => error_reply(id.as_ref(), &e),
        };
        let (name, args) = match check_request(request) {
            Ok(request) => request,
            Err(e) => return Next::Reply(reply(Err(e))),
        };
        if name == CAPABILITIES {
            return Next::Reply(reply(self.negotiate(args)));
        }
        if !self.negotiated {
            return Next::Reply(reply(Err(QmpError::command_not_found(
                "Expecting capabilities negotiation with 'qmp_capabilities'",
            ))));
        }
        if name == QUERY_COMMANDS {
            let result = Args::new(args).finish().map(|()| query_commands(commands));
            return Next::Reply(reply(result));
        }
        if !commands.names().contains(&name.as_str()) {
            return Next::Reply(reply(Err(QmpError::command_not_found(format!(
                "The command {name} has not been found"
            )))));
        }
        Next::Run(Request { name, args, id })
    }

    /// `qmp_capabilities`: its arguments are checked first, as QEMU checks
    /// any command's, then whether negotiation is still open.
    fn negotiate(&mut self, args: Map<String, Value>) -> Result<Value, QmpError> {
        let mut args = Args::new(args);
        let enable = args.opt_str_list("enable")?.unwrap_or_default();
        args.finish()?;
        for (i, cap) in enable.iter().enumerate() {
            // QEMU knows one capability, `oob`; anything else is not one.
            if cap != "oob" {
                return Err(QmpError::generic(format!(
                    "Parameter 'enable[{i}]' does not accept value '{cap}'"
                )));
            }
        }
        if self.negotiated {
            return Err(QmpError::command_not_found(
                "Capabilities negotiation is already complete, command ignored",
            ));
        }
        if !enable.is_empty() {
            // We offer no capability, so every one asked for is refused.
            return Err(QmpError::generic(format!(
                "Capability {} not available",
                enable.join(", ")
            )));
        }
        self.negotiated = true;
        Ok(json!({}))
    }
}

/// Checks a request's members as QEMU does, in the map's order: `execute`
/// a string, `arguments` an object, `id` anything, nothing else. Returns
/// the command name and its arguments (empty when absent).
fn check_request(request: Map<String, Value>) -> Result<(String, Map<String, Value>), QmpError> {
    let mut name = None;
    let mut args = Map::new();
    for (key, value) in request {
        match (key.as_str(), value) {
            ("execute", Value::String(s)) => name = Some(s),
            ("execute", _) => {
                return Err(QmpError::generic(
                    "QMP input member 'execute' must be a string",
                ))
            }
            ("arguments", Value::Object(m)) => args = m,
            ("arguments", _) => {
                return Err(QmpError::generic(
                    "QMP input member 'arguments' must be an object",
                ))
            }
            ("id", _) => {}
            _ => {
                return Err(QmpError::generic(format!(
                    "QMP input member '{key}' is unexpected"
                )))
            }
        }
    }
    let name = name.ok_or_else(|| QmpError::generic("QMP input lacks member 'execute'"))?;
    Ok((name, args))
}

/// `[{"name": ...}, ...]`: the protocol's own commands, then the VMM's.
fn query_commands(commands: &dyn Commands) -> Value {
    let mut names = vec![CAPABILITIES, QUERY_COMMANDS];
    for name in commands.names() {
        if !names.contains(&name) {
            names.push(name);
        }
    }
    Value::Array(names.into_iter().map(|n| json!({ "name": n })).collect())
}

/// `{"return": RET, "id": ID}`, members in QEMU's order.
fn return_reply(id: Option<&Value>, ret: &Value) -> Vec<u8> {
    let mut out = String::from("{");
    wire::write_member(&mut out, "return", ret);
    if let Some(id) = id {
        out.push_str(", ");
        wire::write_member(&mut out, "id", id);
    }
    out.push('}');
    wire::finish(out)
}

/// `{"id": ID, "error": {"class": ..., "desc": ...}}`, in QEMU's order.
fn error_reply(id: Option<&Value>, err: &QmpError) -> Vec<u8> {
    let mut out = String::from("{");
    if let Some(id) = id {
        wire::write_member(&mut out, "id", id);
        out.push_str(", ");
    }
    wire::write_member(&mut out, "error", &err.to_json());
    out.push('}');
    wire::finish(out)
}

/// `major.minor.micro` from a Cargo version; a part that is missing or not
/// a number (say `1.2.3-rc1`'s micro) reads as its leading digits, or 0.
/// The greeting and `query-version` both read the version through it.
pub fn version_triple(version: &str) -> (u64, u64, u64) {
    let mut parts = version.split('.').map(|p| {
        let digits = p.bytes().take_while(u8::is_ascii_digit).count();
        p[..digits].parse().unwrap_or(0)
    });
    let mut next = || parts.next().unwrap_or(0);
    (next(), next(), next())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::qmp::Event;

    /// A few commands to dispatch to.
    struct Fake;

    impl Commands for Fake {
        fn names(&self) -> Vec<&'static str> {
            vec!["echo", "fail", "typed"]
        }

        fn execute(&self, name: &str, args: Map<String, Value>) -> Result<Value, QmpError> {
            match name {
                "echo" => Ok(Value::Object(args)),
                "fail" => Err(QmpError::device_not_found("Device 'x' not found")),
                "typed" => {
                    let mut a = Args::new(args);
                    let device = a.str("device")?;
                    let speed = a.opt_i64("speed")?;
                    let auto = a.opt_bool("auto-finalize")?;
                    a.finish()?;
                    Ok(json!({"device": device, "speed": speed, "auto": auto}))
                }
                _ => unreachable!("dispatched an unlisted command"),
            }
        }
    }

    /// The messages in `out`, each checked to end with CRLF.
    fn messages(out: &[u8]) -> Vec<Value> {
        let text = std::str::from_utf8(out).unwrap();
        assert!(text.is_empty() || text.ends_with("\r\n"), "{text:?}");
        text.split_terminator("\r\n")
            .map(|m| serde_json::from_str(m).unwrap())
            .collect()
    }

    fn send(s: &mut Session, input: &str) -> Vec<Value> {
        messages(&s.feed(input.as_bytes(), &Fake))
    }

    fn negotiated() -> Session {
        let mut s = Session::new();
        assert_eq!(
            send(&mut s, r#"{"execute": "qmp_capabilities"}"#),
            [json!({"return": {}})]
        );
        s
    }

    fn error(class: &str, desc: &str) -> Value {
        json!({"error": {"class": class, "desc": desc}})
    }

    fn generic(desc: &str) -> Value {
        error("GenericError", desc)
    }

    #[test]
    fn greeting_names_us_and_offers_nothing() {
        let g = Session::greeting();
        assert!(g.ends_with(b"}}\r\n"));
        let v = &messages(&g)[0];
        let (major, minor, micro) = version_triple(env!("CARGO_PKG_VERSION"));
        assert_eq!(
            *v,
            json!({"QMP": {
                "version": {
                    "qemu": {"micro": micro, "minor": minor, "major": major},
                    "package": format!("vmm {}", env!("CARGO_PKG_VERSION")),
                },
                "capabilities": [],
            }})
        );
    }

    #[test]
    fn version_triples() {
        assert_eq!(version_triple("0.1.0"), (0, 1, 0));
        assert_eq!(version_triple("10.2.13"), (10, 2, 13));
        assert_eq!(version_triple("1.2.0-rc1"), (1, 2, 0));
        assert_eq!(version_triple("3"), (3, 0, 0));
    }

    #[test]
    fn commands_wait_for_negotiation() {
        let mut s = Session::new();
        let expecting = error(
            "CommandNotFound",
            "Expecting capabilities negotiation with 'qmp_capabilities'",
        );
        for name in ["echo", "query-commands", "nope"] {
            let input = format!(r#"{{"execute": "{name}"}}"#);
            assert_eq!(
                send(&mut s, &input),
                std::slice::from_ref(&expecting),
                "{name}"
            );
        }
        assert!(!s.accepts_events());
        assert_eq!(
            send(&mut s, r#"{"execute": "qmp_capabilities", "id": 7}"#),
            [json!({"return": {}, "id": 7})]
        );
        assert!(s.accepts_events());
        assert_eq!(
            send(&mut s, r#"{"execute": "qmp_capabilities"}"#),
            [error(
                "CommandNotFound",
                "Capabilities negotiation is already complete, command ignored"
            )]
        );
        assert_eq!(
            send(&mut s, r#"{"execute": "echo"}"#),
            [json!({"return": {}})]
        );
    }

    #[test]
    fn no_capability_is_offered() {
        let mut s = Session::new();
        let asks = [
            (
                r#"{"enable": ["oob"]}"#,
                generic("Capability oob not available"),
            ),
            (
                r#"{"enable": ["oob", "oob"]}"#,
                generic("Capability oob, oob not available"),
            ),
            (
                r#"{"enable": ["foo"]}"#,
                generic("Parameter 'enable[0]' does not accept value 'foo'"),
            ),
            (
                r#"{"enable": "oob"}"#,
                generic("Invalid parameter type for 'enable', expected: array"),
            ),
            (
                r#"{"enable": [1]}"#,
                generic("Invalid parameter type for 'enable[0]', expected: string"),
            ),
            (
                r#"{"bogus": 1}"#,
                generic("Parameter 'bogus' is unexpected"),
            ),
        ];
        for (args, reply) in asks {
            let input = format!(r#"{{"execute": "qmp_capabilities", "arguments": {args}}}"#);
            assert_eq!(send(&mut s, &input), [reply], "{args}");
            assert!(!s.accepts_events());
        }
        let input = r#"{"execute": "qmp_capabilities", "arguments": {"enable": []}}"#;
        assert_eq!(send(&mut s, input), [json!({"return": {}})]);
    }

    #[test]
    fn id_of_any_type_is_echoed() {
        let mut s = negotiated();
        for id in [
            json!(1),
            json!(-2.5),
            json!("x"),
            json!("é\n"),
            json!(null),
            json!(true),
            json!([1, {"a": null}]),
            json!({"z": 1, "a": [2]}),
        ] {
            let ok = json!({"execute": "echo", "id": id}).to_string();
            assert_eq!(send(&mut s, &ok), [json!({"return": {}, "id": id})]);
            let bad = json!({"execute": "fail", "id": id}).to_string();
            let mut reply = error("DeviceNotFound", "Device 'x' not found");
            reply["id"] = id.clone();
            assert_eq!(send(&mut s, &bad), [reply]);
        }
    }

    #[test]
    fn replies_keep_qemu_member_order() {
        let mut s = negotiated();
        let out = s.feed(br#"{"execute": "echo", "id": 5}"#, &Fake);
        assert_eq!(out, b"{\"return\": {}, \"id\": 5}\r\n");
        let out = s.feed(br#"{"execute": "nope", "id": "a"}"#, &Fake);
        assert_eq!(
            out,
            b"{\"id\": \"a\", \"error\": {\"class\": \"CommandNotFound\", \
              \"desc\": \"The command nope has not been found\"}}\r\n"
        );
    }

    #[test]
    fn input_split_byte_by_byte() {
        let mut s = negotiated();
        let input = r#"{"execute": "echo", "arguments": {"s": "}{\"", "n": [1, 2]}, "id": 42}"#;
        let mut out = Vec::new();
        for b in input.as_bytes() {
            assert!(out.is_empty());
            out.extend(s.feed(std::slice::from_ref(b), &Fake));
        }
        assert_eq!(
            messages(&out),
            [json!({"return": {"s": "}{\"", "n": [1, 2]}, "id": 42})]
        );
        assert!(!s.is_mid_value());
    }

    #[test]
    fn several_objects_in_one_chunk_without_newlines() {
        let mut s = Session::new();
        let input = concat!(
            r#"{"execute":"qmp_capabilities"}"#,
            r#"{"execute":"echo","id":1}"#,
            r#"{"execute":"echo","arguments":{"a":1},"id":2}"#,
            r#"{"execute":"typed","arguments":{"device":"d"},"id":3}"#,
        );
        assert_eq!(
            send(&mut s, input),
            [
                json!({"return": {}}),
                json!({"return": {}, "id": 1}),
                json!({"return": {"a": 1}, "id": 2}),
                json!({"return": {"device": "d", "speed": null, "auto": null}, "id": 3}),
            ]
        );
    }

    #[test]
    fn replies_come_one_at_a_time() {
        let mut s = negotiated();
        s.push_input(br#"{"execute":"echo","id":1}{"execute":"echo","id":2}{"exe"#);
        assert_eq!(
            messages(&s.next_reply(&Fake).unwrap()),
            [json!({"return": {}, "id": 1})]
        );
        assert_eq!(
            messages(&s.next_reply(&Fake).unwrap()),
            [json!({"return": {}, "id": 2})]
        );
        assert_eq!(s.next_reply(&Fake), None);
        assert!(s.is_mid_value());
        s.push_input(br#"cute":"echo","id":3}"#);
        assert_eq!(
            messages(&s.next_reply(&Fake).unwrap()),
            [json!({"return": {}, "id": 3})]
        );
        assert!(!s.is_mid_value());
    }

    #[test]
    fn malformed_json_then_a_good_command() {
        let mut s = negotiated();
        let out = send(
            &mut s,
            "{\"execute\": bad}\n{\"execute\": \"echo\", \"id\": 2}",
        );
        assert_eq!(out.len(), 2);
        assert_eq!(out[0]["error"]["class"], "GenericError");
        let desc = out[0]["error"]["desc"].as_str().unwrap();
        assert!(desc.starts_with("JSON parse error, "), "{desc}");
        assert_eq!(out[1], json!({"return": {}, "id": 2}));

        // Garbage between objects, a stray closer, an unterminated string.
        let input = "{\"execute\":\"echo\",\"id\":1} garbage }\n{\"a\": \"x\n{\"execute\":\"echo\",\"id\":2}";
        let out = send(&mut s, input);
        let errors: Vec<_> = out.iter().filter(|v| v.get("error").is_some()).collect();
        assert_eq!(errors.len(), 3, "{out:?}");
        assert_eq!(out.first(), Some(&json!({"return": {}, "id": 1})));
        assert_eq!(out.last(), Some(&json!({"return": {}, "id": 2})));
    }

    #[test]
    fn oversized_input_is_refused_and_the_connection_recovers() {
        let mut s = negotiated();
        let big = format!(
            r#"{{"execute": "echo", "arguments": {{"s": "{}"}}}}"#,
            "x".repeat(MAX_INPUT)
        );
        let mut out = Vec::new();
        for chunk in big.as_bytes().chunks(64 * 1024) {
            out.extend(s.feed(chunk, &Fake));
        }
        out.extend(s.feed(br#"{"execute": "echo", "id": 1}"#, &Fake));
        assert_eq!(
            messages(&out),
            [
                generic(&format!(
                    "JSON parse error, input longer than {MAX_INPUT} bytes"
                )),
                json!({"return": {}, "id": 1}),
            ]
        );
    }

    #[test]
    fn requests_must_be_well_formed() {
        let mut s = negotiated();
        let cases = [
            ("[1, 2]", generic("QMP input must be a JSON object")),
            ("\"str\"", generic("QMP input must be a JSON object")),
            ("42\n", generic("QMP input must be a JSON object")),
            ("{}", generic("QMP input lacks member 'execute'")),
            (
                r#"{"execute": 1}"#,
                generic("QMP input member 'execute' must be a string"),
            ),
            (
                r#"{"execute": "echo", "arguments": []}"#,
                generic("QMP input member 'arguments' must be an object"),
            ),
            (
                r#"{"execute": "echo", "foo": 1}"#,
                generic("QMP input member 'foo' is unexpected"),
            ),
            (
                r#"{"exec-oob": "echo"}"#,
                generic("QMP input member 'exec-oob' is unexpected"),
            ),
        ];
        for (input, reply) in cases {
            assert_eq!(send(&mut s, input), [reply], "{input}");
        }
        // The id still comes back when the rest is wrong.
        let mut reply = generic("QMP input lacks member 'execute'");
        reply["id"] = json!(1);
        assert_eq!(send(&mut s, r#"{"id": 1}"#), [reply]);
        // Malformed requests are refused before negotiation is looked at.
        let mut fresh = Session::new();
        let out = send(&mut fresh, r#"{"execute": "echo", "foo": 1}"#);
        assert_eq!(out, [generic("QMP input member 'foo' is unexpected")]);
    }

    #[test]
    fn arguments_are_checked_by_args() {
        let mut s = negotiated();
        let cases = [
            (json!({}), generic("Parameter 'device' is missing")),
            (
                json!({"device": 1}),
                generic("Invalid parameter type for 'device', expected: string"),
            ),
            (
                json!({"device": "d", "speed": 1.5}),
                generic("Invalid parameter type for 'speed', expected: integer"),
            ),
            (
                json!({"device": "d", "auto-finalize": "yes"}),
                generic("Invalid parameter type for 'auto-finalize', expected: boolean"),
            ),
            (
                json!({"device": "d", "what": 1}),
                generic("Parameter 'what' is unexpected"),
            ),
        ];
        for (args, reply) in cases {
            let input = json!({"execute": "typed", "arguments": args}).to_string();
            assert_eq!(send(&mut s, &input), [reply], "{args}");
        }
    }

    #[test]
    fn unknown_commands_are_command_not_found() {
        let mut s = negotiated();
        assert_eq!(
            send(&mut s, r#"{"execute": "query-version"}"#),
            [error(
                "CommandNotFound",
                "The command query-version has not been found"
            )]
        );
    }

    #[test]
    fn query_commands_lists_ours_and_the_vmms() {
        let mut s = negotiated();
        let out = send(&mut s, r#"{"execute": "query-commands", "id": 1}"#);
        assert_eq!(
            out,
            [json!({"return": [
            {"name": "qmp_capabilities"},
            {"name": "query-commands"},
            {"name": "echo"},
            {"name": "fail"},
            {"name": "typed"},
        ], "id": 1})]
        );
        let out = send(
            &mut s,
            r#"{"execute": "query-commands", "arguments": {"x": 1}}"#,
        );
        assert_eq!(out, [generic("Parameter 'x' is unexpected")]);
    }

    #[test]
    fn events_only_after_negotiation() {
        let e = Event::new("STOP", None).encode();
        let v = &messages(&e)[0];
        assert_eq!(v["event"], "STOP");
        assert!(v.get("data").is_none());
        assert!(v["timestamp"]["seconds"].is_u64());
        assert!(v["timestamp"]["microseconds"].as_u64().unwrap() < 1_000_000);
        assert!(!Session::new().accepts_events());
        assert!(negotiated().accepts_events());
    }
}
