//! Typed command arguments. A command takes each member it knows by name
//! and type, then calls [`Args::finish`] to refuse the ones it does not
//! know; every failure is a `GenericError` worded as QEMU words it, so
//! clients written against QEMU read the same messages:
//!
//! ```
//! # use serde_json::json;
//! # use vmm::qmp::{Args, QmpError};
//! # fn f() -> Result<(), QmpError> {
//! let map = json!({"device": "job0", "speed": 1024}).as_object().unwrap().clone();
//! let mut a = Args::new(map);
//! let device = a.str("device")?;
//! let speed = a.opt_i64("speed")?;
//! let auto_finalize = a.opt_bool("auto-finalize")?;
//! a.finish()?;
//! # assert_eq!((device.as_str(), speed, auto_finalize), ("job0", Some(1024), None));
//! # Ok(()) }
//! # f().unwrap();
//! ```
//!
//! A member given as `null` is not absent: it is a member of the wrong
//! type, as in QEMU.

use serde_json::{Map, Value};

use super::error::QmpError;

/// `Parameter 'NAME' is missing`.
pub fn missing(name: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is missing"))
}

/// `Invalid parameter type for 'NAME', expected: EXPECTED`.
pub fn invalid_type(name: &str, expected: &str) -> QmpError {
    QmpError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

/// `Parameter 'NAME' is unexpected`.
pub fn unexpected(name: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' is unexpected"))
}

/// `Parameter 'NAME' expects WHAT`: QEMU's wording for a value of the right
/// JSON type that is out of range (and for any bad `uint64`).
pub fn expects(name: &str, what: &str) -> QmpError {
    QmpError::generic(format!("Parameter '{name}' expects {what}"))
}

/// The members of one JSON object, taken one by one.
#[derive(Debug, Clone, Default)]
pub struct Args {
    map: Map<String, Value>,
    /// Put before member names in messages: `options.` for a nested
    /// object, `actions[2].` for an object in a list, as QEMU names them.
    prefix: String,
}

impl Args {
    /// Arguments of a command (the `arguments` object).
    pub fn new(map: Map<String, Value>) -> Self {
        Self::nested(map, String::new())
    }

    fn nested(map: Map<String, Value>, prefix: String) -> Self {
        Self { map, prefix }
    }

    /// Whether `name` is present (and not yet taken).
    pub fn has(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    fn take<T>(
        &mut self,
        name: &str,
        convert: impl FnOnce(&str, Value) -> Result<T, QmpError>,
    ) -> Result<Option<T>, QmpError> {
        match self.map.remove(name) {
            Some(v) => convert(&self.full(name), v).map(Some),
            None => Ok(None),
        }
    }

    fn take_required<T>(
        &mut self,
        name: &str,
        convert: impl FnOnce(&str, Value) -> Result<T, QmpError>,
    ) -> Result<T, QmpError> {
        self.take(name, convert)?
            .ok_or_else(|| missing(&self.full(name)))
    }

    /// A required string.
    pub fn str(&mut self, name: &str) -> Result<String, QmpError> {
        self.take_required(name, to_string)
    }

    /// An optional string.
    pub fn opt_str(&mut self, name: &str) -> Result<Option<String>, QmpError> {
        self.take(name, to_string)
    }

    /// A required `int` (a JSON integer within i64).
    pub fn i64(&mut self, name: &str) -> Result<i64, QmpError> {
        self.take_required(name, to_i64)
    }

    /// An optional `int`.
    pub fn opt_i64(&mut self, name: &str) -> Result<Option<i64>, QmpError> {
        self.take(name, to_i64)
    }

    /// A required `uint64` (a JSON integer from 0 to u64::MAX).
    pub fn u64(&mut self, name: &str) -> Result<u64, QmpError> {
        self.take_required(name, to_u64)
    }

    /// An optional `uint64`.
    pub fn opt_u64(&mut self, name: &str) -> Result<Option<u64>, QmpError> {
        self.take(name, to_u64)
    }

    /// A required boolean.
    pub fn bool(&mut self, name: &str) -> Result<bool, QmpError> {
        self.take_required(name, to_bool)
    }

    /// An optional boolean.
    pub fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, QmpError> {
        self.take(name, to_bool)
    }

    /// A required `number` (any JSON number, integers included).
    pub fn number(&mut self, name: &str) -> Result<f64, QmpError> {
        self.take_required(name, to_number)
    }

    /// An optional `number`.
    pub fn opt_number(&mut self, name: &str) -> Result<Option<f64>, QmpError> {
        self.take(name, to_number)
    }

    /// A required object, as it came.
    pub fn object(&mut self, name: &str) -> Result<Map<String, Value>, QmpError> {
        self.take_required(name, to_object)
    }

    /// An optional object, as it came.
    pub fn opt_object(&mut self, name: &str) -> Result<Option<Map<String, Value>>, QmpError> {
        self.take(name, to_object)
    }

    /// A required array, as it came.
    pub fn array(&mut self, name: &str) -> Result<Vec<Value>, QmpError> {
        self.take_required(name, to_array)
    }

    /// An optional array, as it came.
    pub fn opt_array(&mut self, name: &str) -> Result<Option<Vec<Value>>, QmpError> {
        self.take(name, to_array)
    }

    /// A required member of any type (`any` in QAPI).
    pub fn value(&mut self, name: &str) -> Result<Value, QmpError> {
        self.take_required(name, |_, v| Ok(v))
    }

    /// An optional member of any type.
    pub fn opt_value(&mut self, name: &str) -> Result<Option<Value>, QmpError> {
        self.take(name, |_, v| Ok(v))
    }

    /// A required object, to be taken member by member; messages name its
    /// members `NAME.member`.
    pub fn args(&mut self, name: &str) -> Result<Args, QmpError> {
        self.take_required(name, to_args)
    }

    /// An optional object, to be taken member by member.
    pub fn opt_args(&mut self, name: &str) -> Result<Option<Args>, QmpError> {
        self.take(name, to_args)
    }

    /// A required list of strings; messages name items `NAME[i]`.
    pub fn str_list(&mut self, name: &str) -> Result<Vec<String>, QmpError> {
        self.take_required(name, |n, v| to_list(n, v, to_string))
    }

    /// An optional list of strings.
    pub fn opt_str_list(&mut self, name: &str) -> Result<Option<Vec<String>>, QmpError> {
        self.take(name, |n, v| to_list(n, v, to_string))
    }

    /// A required list of objects, each taken member by member; messages
    /// name their members `NAME[i].member`.
    pub fn args_list(&mut self, name: &str) -> Result<Vec<Args>, QmpError> {
        self.take_required(name, |n, v| to_list(n, v, to_args))
    }

    /// An optional list of objects.
    pub fn opt_args_list(&mut self, name: &str) -> Result<Option<Vec<Args>>, QmpError> {
        self.take(name, |n, v| to_list(n, v, to_args))
    }

    /// An optional list whose items `item` converts, each given its name
    /// (`NAME[i]`) for messages: for lists of alternates.
    pub fn opt_list<T>(
        &mut self,
        name: &str,
        item: impl Fn(&str, Value) -> Result<T, QmpError>,
    ) -> Result<Option<Vec<T>>, QmpError> {
        self.take(name, |n, v| to_list(n, v, item))
    }

    /// The object `v`, named `name` in messages, taken member by member.
    pub fn from_value(name: &str, v: Value) -> Result<Args, QmpError> {
        to_args(name, v)
    }

    /// Refuses any member not taken: QMP rejects what it does not know
    /// rather than ignoring it, so a typo never goes unnoticed.
    pub fn finish(self) -> Result<(), QmpError> {
        match self.map.keys().next() {
            Some(name) => Err(unexpected(&format!("{}{name}", self.prefix))),
            None => Ok(()),
        }
    }
}

fn to_string(name: &str, v: Value) -> Result<String, QmpError> {
    match v {
        Value::String(s) => Ok(s),
        _ => Err(invalid_type(name, "string")),
    }
}

fn to_i64(name: &str, v: Value) -> Result<i64, QmpError> {
    // An integer beyond i64 is a type error in QEMU too (it is parsed as a
    // float or unsigned number there, never as an `int`).
    v.as_i64().ok_or_else(|| invalid_type(name, "integer"))
}

fn to_u64(name: &str, v: Value) -> Result<u64, QmpError> {
    // QEMU words every bad uint64 this way; unlike QEMU, which wraps a
    // negative integer for old clients, a negative size is refused here.
    v.as_u64().ok_or_else(|| expects(name, "uint64"))
}

fn to_bool(name: &str, v: Value) -> Result<bool, QmpError> {
    v.as_bool().ok_or_else(|| invalid_type(name, "boolean"))
}

fn to_number(name: &str, v: Value) -> Result<f64, QmpError> {
    v.as_f64().ok_or_else(|| invalid_type(name, "number"))
}

fn to_object(name: &str, v: Value) -> Result<Map<String, Value>, QmpError> {
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(invalid_type(name, "object")),
    }
}

fn to_array(name: &str, v: Value) -> Result<Vec<Value>, QmpError> {
    match v {
        Value::Array(a) => Ok(a),
        _ => Err(invalid_type(name, "array")),
    }
}

fn to_args(name: &str, v: Value) -> Result<Args, QmpError> {
    to_object(name, v).map(|m| Args::nested(m, format!("{name}.")))
}

fn to_list<T>(
    name: &str,
    v: Value,
    item: impl Fn(&str, Value) -> Result<T, QmpError>,
) -> Result<Vec<T>, QmpError> {
    to_array(name, v)?
        .into_iter()
        .enumerate()
        .map(|(i, v)| item(&format!("{name}[{i}]"), v))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::qmp::ErrorClass;

    fn args(v: Value) -> Args {
        Args::new(v.as_object().unwrap().clone())
    }

    fn desc(e: QmpError) -> String {
        assert_eq!(e.class, ErrorClass::GenericError);
        e.desc
    }

    #[test]
    fn takes_each_type() {
        let mut a = args(json!({
            "s": "x", "i": -3, "u": 18446744073709551615u64, "b": true,
            "n": 1.5, "ni": 2, "o": {"k": 1}, "a": [1], "v": null,
        }));
        assert_eq!(a.str("s").unwrap(), "x");
        assert_eq!(a.i64("i").unwrap(), -3);
        assert_eq!(a.u64("u").unwrap(), u64::MAX);
        assert!(a.bool("b").unwrap());
        assert_eq!(a.number("n").unwrap(), 1.5);
        assert_eq!(a.number("ni").unwrap(), 2.0);
        assert_eq!(a.object("o").unwrap()["k"], json!(1));
        assert_eq!(a.array("a").unwrap(), vec![json!(1)]);
        assert_eq!(a.value("v").unwrap(), Value::Null);
        assert_eq!(a.opt_str("gone").unwrap(), None);
        assert_eq!(a.opt_i64("gone").unwrap(), None);
        a.finish().unwrap();
    }

    #[test]
    fn missing_members_are_named() {
        let mut a = args(json!({}));
        assert_eq!(
            desc(a.str("device").unwrap_err()),
            "Parameter 'device' is missing"
        );
        assert_eq!(
            desc(a.i64("speed").unwrap_err()),
            "Parameter 'speed' is missing"
        );
    }

    #[test]
    fn wrong_types_name_the_expected_type() {
        let mut a = args(json!({
            "s": 1, "i": "1", "b": 1, "n": "1", "o": [], "a": {}, "null": null,
        }));
        let cases = [
            (
                a.str("s").unwrap_err(),
                "Invalid parameter type for 's', expected: string",
            ),
            (
                a.i64("i").unwrap_err(),
                "Invalid parameter type for 'i', expected: integer",
            ),
            (
                a.bool("b").unwrap_err(),
                "Invalid parameter type for 'b', expected: boolean",
            ),
            (
                a.number("n").unwrap_err(),
                "Invalid parameter type for 'n', expected: number",
            ),
            (
                a.object("o").unwrap_err(),
                "Invalid parameter type for 'o', expected: object",
            ),
            (
                a.array("a").unwrap_err(),
                "Invalid parameter type for 'a', expected: array",
            ),
            (
                a.opt_str("null").unwrap_err(),
                "Invalid parameter type for 'null', expected: string",
            ),
        ];
        for (err, text) in cases {
            assert_eq!(desc(err), text);
        }
    }

    #[test]
    fn integers_are_exact_and_range_checked() {
        let mut a = args(json!({
            "f": 1.5, "whole": 1.0, "big": 18446744073709551615u64, "b": true,
        }));
        let int = "Invalid parameter type for 'f', expected: integer";
        assert_eq!(desc(a.i64("f").unwrap_err()), int);
        // 1.0 is a float in JSON's eyes, and in QEMU's.
        assert!(a.opt_i64("whole").is_err());
        assert_eq!(
            desc(a.i64("big").unwrap_err()),
            "Invalid parameter type for 'big', expected: integer"
        );
        assert!(a.i64("b").is_err());

        let mut a = args(json!({"neg": -1, "f": 2.5, "s": "1"}));
        assert_eq!(
            desc(a.u64("neg").unwrap_err()),
            "Parameter 'neg' expects uint64"
        );
        assert_eq!(
            desc(a.opt_u64("f").unwrap_err()),
            "Parameter 'f' expects uint64"
        );
        assert_eq!(
            desc(a.u64("s").unwrap_err()),
            "Parameter 's' expects uint64"
        );
    }

    #[test]
    fn finish_refuses_members_not_taken() {
        let mut a = args(json!({"device": "d", "extra": 1}));
        a.str("device").unwrap();
        assert_eq!(
            desc(a.finish().unwrap_err()),
            "Parameter 'extra' is unexpected"
        );
        assert!(args(json!({})).finish().is_ok());
    }

    #[test]
    fn nested_members_are_named_by_path() {
        let mut a = args(json!({
            "options": {"driver": "file", "zz": 1},
            "actions": [{"type": "x", "data": {"node": 1}}, 2],
            "enable": ["oob", 1],
        }));
        let mut options = a.args("options").unwrap();
        assert_eq!(options.str("driver").unwrap(), "file");
        assert_eq!(
            desc(options.u64("size").unwrap_err()),
            "Parameter 'options.size' is missing"
        );
        assert_eq!(
            desc(options.finish().unwrap_err()),
            "Parameter 'options.zz' is unexpected"
        );

        assert_eq!(
            desc(a.clone().args_list("actions").unwrap_err()),
            "Invalid parameter type for 'actions[1]', expected: object"
        );
        assert_eq!(
            desc(a.str_list("enable").unwrap_err()),
            "Invalid parameter type for 'enable[1]', expected: string"
        );
        let mut list = args(json!({"actions": [{"data": {"node": 1}}]}));
        let mut action = list.args_list("actions").unwrap().remove(0);
        let mut data = action.args("data").unwrap();
        assert_eq!(
            desc(data.str("node").unwrap_err()),
            "Invalid parameter type for 'actions[0].data.node', expected: string"
        );
    }
}
