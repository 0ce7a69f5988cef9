//! JSON as QMP writes it: `", "` and `": "` between members and items, and
//! only ASCII (anything else as `\uXXXX`), so a reply reads the same as
//! QEMU's in a log and no client ever has to guess an encoding. Each
//! message ends with `"\r\n"`.

use std::fmt::Write;

use serde_json::Value;

/// What ends every message the server sends.
pub const END: &[u8] = b"\r\n";

/// Appends `value` to `out`.
pub fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        // serde_json prints numbers as JSON already (no NaN can get here).
        Value::Number(n) => {
            let _ = write!(out, "{n}");
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_member(out, k, v);
            }
            out.push('}');
        }
    }
}

/// Appends `"key": value` to `out`.
pub fn write_member(out: &mut String, key: &str, value: &Value) {
    write_str(out, key);
    out.push_str(": ");
    write_value(out, value);
}

/// Appends `s` as a JSON string.
pub fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                // Control characters and everything outside ASCII; beyond
                // the BMP as a surrogate pair, as JSON requires.
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04X}");
                }
            }
        }
    }
    out.push('"');
}

/// Ends a message built by hand.
pub fn finish(out: String) -> Vec<u8> {
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(END);
    bytes
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn message(value: &Value) -> Vec<u8> {
        let mut out = String::new();
        write_value(&mut out, value);
        finish(out)
    }

    #[test]
    fn spaces_like_qemu() {
        let v = json!({"a": [1, 2.5, null], "b": {"c": true, "d": false}});
        assert_eq!(
            message(&v),
            b"{\"a\": [1, 2.5, null], \"b\": {\"c\": true, \"d\": false}}\r\n"
        );
        assert_eq!(message(&json!({})), b"{}\r\n");
        assert_eq!(message(&json!([])), b"[]\r\n");
    }

    #[test]
    fn strings_are_ascii_and_parse_back() {
        let s = "q\"b\\s/\n\r\t\u{8}\u{c}\u{1}\u{7f}é😀";
        let mut out = String::new();
        write_str(&mut out, s);
        assert!(out.is_ascii());
        assert_eq!(out, r#""q\"b\\s/\n\r\t\b\f\u0001\u007F\u00E9\uD83D\uDE00""#);
        assert_eq!(serde_json::from_str::<String>(&out).unwrap(), s);
    }

    #[test]
    fn output_round_trips() {
        let v = json!({"id": [1, -2, 18446744073709551615u64, 1e300, "x", {"y": null}]});
        let bytes = message(&v);
        assert!(bytes.ends_with(b"\r\n"));
        assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), v);
    }
}
