//! Cuts the client's byte stream into JSON texts, without parsing them.
//!
//! QMP input is a stream of JSON values, not of lines: a client may send
//! several objects in one write with nothing between them, or one object
//! over many writes. The splitter follows only what decides where a value
//! ends (brackets, strings and their escapes, the end of a bare word like
//! `42` or `true`), one byte at a time and keeping its state between reads,
//! so each byte is looked at once however the input is cut. Each complete
//! text then goes to serde_json, which says whether it is valid.
//!
//! Where a text ends, even an invalid one, is where the next begins; that
//! is how the protocol recovers from bad input (QEMU's JSON streamer works
//! the same way):
//!
//! - `{"execute": bad}` is one text (brackets balance), refused by the
//!   parser; what follows is read afresh.
//! - A stray `}` or `]`, or a `,` or `:` outside any value, is a text of
//!   its own.
//! - A raw control character inside a string (a newline, typically) ends
//!   the text there, so an unterminated string is given up at the end of
//!   its line instead of swallowing the rest of the stream.
//! - A bare word at the very end of the input (`42`) waits for the next
//!   byte: only a delimiter says the number is complete.
//!
//! A text that grows past the limit is reported once and then skipped to
//! its end without being kept, so a client cannot make us hold more than
//! `limit` bytes whatever it sends.

/// What the splitter found.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// One complete JSON text (maybe an invalid one).
    Text(Vec<u8>),
    /// The text being gathered passed the size limit; it is skipped.
    TooLong,
}

/// The splitter's state between reads.
#[derive(Debug)]
pub struct Splitter {
    /// The text being gathered.
    text: Vec<u8>,
    limit: usize,
    /// Open `{` and `[` (not told apart: the parser checks they match).
    depth: usize,
    in_string: bool,
    /// The previous byte was a backslash inside a string.
    escape: bool,
    /// Inside a bare word at the top level (`42`, `true`, `garbage`).
    bare: bool,
    /// The current text passed the limit: follow it to its end, keep
    /// nothing.
    skipping: bool,
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r')
}

/// Bytes that end a bare word.
fn ends_word(b: u8) -> bool {
    is_space(b) || matches!(b, b'{' | b'}' | b'[' | b']' | b'"' | b',' | b':')
}

impl Splitter {
    /// A splitter that gives up on texts longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            text: Vec::new(),
            limit,
            depth: 0,
            in_string: false,
            escape: false,
            bare: false,
            skipping: false,
        }
    }

    /// Whether part of a text has been seen but not its end.
    pub fn is_mid_text(&self) -> bool {
        !self.text.is_empty() || self.skipping
    }

    /// Reads `input` until one piece is found: returns how many bytes it
    /// used and the piece, or all of `input` and `None` if it ended first.
    pub fn next(&mut self, input: &[u8]) -> (usize, Option<Piece>) {
        for (i, &b) in input.iter().enumerate() {
            if self.in_string {
                if !self.keep(b) {
                    return (i + 1, Some(Piece::TooLong));
                }
                if self.escape {
                    self.escape = false;
                } else if b == b'\\' {
                    self.escape = true;
                } else if b == b'"' {
                    self.in_string = false;
                    if self.depth == 0 {
                        if let Some(p) = self.end() {
                            return (i + 1, Some(p));
                        }
                    }
                } else if b < 0x20 {
                    if let Some(p) = self.end() {
                        return (i + 1, Some(p));
                    }
                }
                continue;
            }
            if self.bare {
                if !ends_word(b) {
                    if !self.keep(b) {
                        return (i + 1, Some(Piece::TooLong));
                    }
                    continue;
                }
                // The delimiter belongs to what follows: not used here.
                if let Some(p) = self.end() {
                    return (i, Some(p));
                }
                // A skipped word ended: read the delimiter afresh, below.
            }
            if is_space(b) && self.depth == 0 {
                continue;
            }
            if !self.keep(b) {
                return (i + 1, Some(Piece::TooLong));
            }
            match b {
                b'"' => self.in_string = true,
                b'{' | b'[' => self.depth += 1,
                b'}' | b']' => {
                    // A closer at depth 0 is stray: it ends a text of one byte.
                    self.depth = self.depth.saturating_sub(1);
                    if self.depth == 0 {
                        if let Some(p) = self.end() {
                            return (i + 1, Some(p));
                        }
                    }
                }
                b',' | b':' if self.depth == 0 => {
                    if let Some(p) = self.end() {
                        return (i + 1, Some(p));
                    }
                }
                _ if self.depth == 0 => self.bare = true,
                _ => {}
            }
        }
        (input.len(), None)
    }

    /// Keeps `b` in the current text; false when this byte passes the limit
    /// (the text is dropped then, and the rest of it skipped).
    fn keep(&mut self, b: u8) -> bool {
        if self.skipping {
            return true;
        }
        if self.text.len() == self.limit {
            self.text = Vec::new();
            self.skipping = true;
            return false;
        }
        self.text.push(b);
        true
    }

    /// Ends the current text: the text, or `None` if it was being skipped.
    fn end(&mut self) -> Option<Piece> {
        let skipped = self.skipping;
        let text = std::mem::take(&mut self.text);
        *self = Self::new(self.limit);
        (!skipped).then_some(Piece::Text(text))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every piece in `chunks`, fed one chunk at a time.
    fn split(limit: usize, chunks: &[&[u8]]) -> Vec<Piece> {
        let mut s = Splitter::new(limit);
        let mut out = Vec::new();
        for chunk in chunks {
            let mut rest = *chunk;
            loop {
                let (used, piece) = s.next(rest);
                rest = &rest[used..];
                match piece {
                    Some(p) => out.push(p),
                    None => break,
                }
            }
            assert!(rest.is_empty());
        }
        out
    }

    fn texts(input: &str) -> Vec<String> {
        split(1 << 20, &[input.as_bytes()])
            .into_iter()
            .map(|p| match p {
                Piece::Text(t) => String::from_utf8(t).unwrap(),
                Piece::TooLong => panic!("too long"),
            })
            .collect()
    }

    #[test]
    fn objects_back_to_back() {
        assert_eq!(
            texts(r#"{"a":1}{"b":[2,{}]} {"c":"}"}"#),
            [r#"{"a":1}"#, r#"{"b":[2,{}]}"#, r#"{"c":"}"}"#]
        );
    }

    #[test]
    fn strings_hide_brackets_and_escaped_quotes() {
        assert_eq!(
            texts(r#"{"a":"\"}{["}{"b":"\\"}"#),
            [r#"{"a":"\"}{["}"#, r#"{"b":"\\"}"#]
        );
    }

    #[test]
    fn byte_by_byte_is_the_same_as_at_once() {
        let input = br#" {"execute": "x", "arguments": {"s": "a\"}"}, "id": [1, "2"]} 17 "s" {}"#;
        let chunks: Vec<&[u8]> = input.chunks(1).collect();
        assert_eq!(split(1 << 20, &chunks), split(1 << 20, &[input]));
        assert_eq!(split(1 << 20, &chunks).len(), 4);
    }

    #[test]
    fn bad_input_is_cut_where_the_next_text_can_start() {
        assert_eq!(
            texts("{\"execute\": bad}\n{\"x\":1}"),
            ["{\"execute\": bad}", "{\"x\":1}"]
        );
        assert_eq!(texts("}{\"x\":1}"), ["}", "{\"x\":1}"]);
        assert_eq!(texts("garbage {} ,x:"), ["garbage", "{}", ",", "x", ":"]);
        assert_eq!(texts("tru{}"), ["tru", "{}"]);
        // An unterminated string is given up at the end of its line.
        assert_eq!(texts("{\"a\": \"oops\n{}"), ["{\"a\": \"oops\n", "{}"]);
    }

    #[test]
    fn a_bare_word_waits_for_its_end() {
        let mut s = Splitter::new(100);
        assert_eq!(s.next(b"4"), (1, None));
        assert!(s.is_mid_text());
        assert_eq!(s.next(b"2\n"), (1, Some(Piece::Text(b"42".to_vec()))));
        assert!(!s.is_mid_text());
    }

    #[test]
    fn incomplete_input_is_kept() {
        let mut s = Splitter::new(100);
        assert_eq!(s.next(b"{\"a\": [1, "), (10, None));
        assert!(s.is_mid_text());
        assert_eq!(
            s.next(b"2]}"),
            (3, Some(Piece::Text(b"{\"a\": [1, 2]}".to_vec())))
        );
        assert!(!s.is_mid_text());
        assert_eq!(s.next(b"  \r\n"), (4, None));
        assert!(!s.is_mid_text());
    }

    #[test]
    fn a_text_past_the_limit_is_reported_once_and_skipped() {
        let big = format!("{{\"a\": \"{}\", \"b\": [{{}}]}}", "x".repeat(100));
        let input = format!("{big}{{\"ok\":1}}");
        let pieces = split(16, &[input.as_bytes()]);
        assert_eq!(
            pieces,
            [Piece::TooLong, Piece::Text(b"{\"ok\":1}".to_vec())]
        );

        // The same, arriving in pieces; memory never passes the limit.
        let mut s = Splitter::new(16);
        let mut found = Vec::new();
        for chunk in input.as_bytes().chunks(7) {
            let mut rest = chunk;
            while !rest.is_empty() {
                let (used, piece) = s.next(rest);
                rest = &rest[used..];
                assert!(s.text.len() <= 16);
                found.extend(piece);
            }
        }
        assert_eq!(found, pieces);

        // A long bare word too.
        let pieces = split(4, &[b"123456789 {}"]);
        assert_eq!(pieces, [Piece::TooLong, Piece::Text(b"{}".to_vec())]);
    }
}
