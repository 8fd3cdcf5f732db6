//! A fast path for the common message: one flat JSON object whose values are plain
//! strings (no escapes), numbers, booleans or null.
//!
//! It is hand-written rather than left to serde_json because parsing was the largest
//! cost of decode → Parquet (measured with `sluice-loadtest bench`), and this shape is
//! nearly every real message. It never decides a message is bad: anything outside the
//! subset it knows — escapes, nesting, a wrong type, a number it cannot represent,
//! malformed text — returns [`Fast::Fallback`] and the serde_json path reads the
//! message again and gives the verdict and the reason. So the fast path only needs to
//! be right about what it accepts; the tests compare it with the serde path.

use sluice_core::schema::{FieldSpec, FieldType};

use super::visitor::{Slot, timestamp_in_range};

/// The fast path's answer.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Fast {
    /// The row is in `slots`/`texts` and every value had the declared type.
    Done,
    /// Not handled here; use the full parser.
    Fallback,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    #[inline]
    fn skip_ws(&mut self) {
        while let Some(b' ' | b'\n' | b'\r' | b'\t') = self.bytes.get(self.at) {
            self.at += 1;
        }
    }

    #[inline]
    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    #[inline]
    fn eat(&mut self, b: u8) -> bool {
        if self.peek() == Some(b) {
            self.at += 1;
            true
        } else {
            false
        }
    }

    /// A string with no escapes or control characters; the text between the quotes.
    #[inline]
    fn plain_string(&mut self, text: &'a str) -> Option<&'a str> {
        if !self.eat(b'"') {
            return None;
        }
        let start = self.at;
        let rest = &self.bytes[start..];
        let len = rest
            .iter()
            .position(|&b| b == b'"' || b == b'\\' || b < 0x20)?;
        if rest[len] != b'"' {
            return None;
        }
        self.at = start + len + 1;
        // `text` is valid UTF-8 and the quotes are ASCII, so this slice is on boundaries.
        text.get(start..start + len)
    }

    /// A JSON number; the text and whether it is an integer (no fraction or exponent).
    #[inline]
    fn number(&mut self, text: &'a str) -> Option<(&'a str, bool)> {
        let start = self.at;
        self.eat(b'-');
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => self.digits(),
            _ => return None,
        }
        let mut integer = true;
        if self.eat(b'.') {
            integer = false;
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return None;
            }
            self.digits();
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            integer = false;
            self.at += 1;
            if !self.eat(b'+') {
                self.eat(b'-');
            }
            if !matches!(self.peek(), Some(b'0'..=b'9')) {
                return None;
            }
            self.digits();
        }
        Some((text.get(start..self.at)?, integer))
    }

    #[inline]
    fn digits(&mut self) {
        while let Some(b'0'..=b'9') = self.peek() {
            self.at += 1;
        }
    }

    #[inline]
    fn literal(&mut self, word: &[u8]) -> bool {
        if self.bytes[self.at..].starts_with(word) {
            self.at += word.len();
            true
        } else {
            false
        }
    }
}

/// Reads `text` into the scratch row, or says to fall back.
pub(super) fn parse(text: &str, fields: &[FieldSpec], slots: &mut [Slot]) -> Fast {
    match parse_inner(text, fields, slots) {
        Some(()) => Fast::Done,
        None => Fast::Fallback,
    }
}

fn parse_inner(text: &str, fields: &[FieldSpec], slots: &mut [Slot]) -> Option<()> {
    let mut c = Cursor {
        bytes: text.as_bytes(),
        at: 0,
    };
    c.skip_ws();
    if !c.eat(b'{') {
        return None;
    }
    c.skip_ws();
    if !c.eat(b'}') {
        // Fields usually arrive in schema order: try the next one first.
        let mut hint = 0;
        loop {
            let key = c.plain_string(text)?;
            c.skip_ws();
            if !c.eat(b':') {
                return None;
            }
            c.skip_ws();
            let index = if fields.get(hint).is_some_and(|f| f.name == key) {
                Some(hint)
            } else {
                fields.iter().position(|f| f.name == key)
            };
            match index {
                Some(i) => {
                    value(&mut c, text, &fields[i], &mut slots[i])?;
                    hint = i + 1;
                }
                None => skip_scalar(&mut c, text)?,
            }
            c.skip_ws();
            if c.eat(b',') {
                c.skip_ws();
                continue;
            }
            if c.eat(b'}') {
                break;
            }
            return None;
        }
    }
    c.skip_ws();
    (c.at == c.bytes.len()).then_some(())
}

fn value<'a>(c: &mut Cursor<'a>, text: &'a str, field: &FieldSpec, slot: &mut Slot) -> Option<()> {
    match c.peek()? {
        b'"' => {
            let s = c.plain_string(text)?;
            match field.ty {
                FieldType::Utf8 => {
                    // Offsets into `text`; payloads are far below 4 GiB (max_payload).
                    let end = u32::try_from(c.at - 1).ok()?;
                    let start = end.checked_sub(u32::try_from(s.len()).ok()?)?;
                    *slot = Slot::Span(start, end);
                }
                FieldType::Timestamp => {
                    let ms = chrono::DateTime::parse_from_rfc3339(s)
                        .ok()?
                        .timestamp_millis();
                    *slot = Slot::I64(timestamp_in_range(ms)?);
                }
                _ => return None,
            }
        }
        b'-' | b'0'..=b'9' => {
            let (n, integer) = c.number(text)?;
            *slot = match field.ty {
                FieldType::Float64 => {
                    let v: f64 = n.parse().ok()?;
                    if !v.is_finite() {
                        return None;
                    }
                    Slot::F64(v)
                }
                FieldType::Int64 if integer => Slot::I64(n.parse().ok()?),
                FieldType::Timestamp if integer => Slot::I64(timestamp_in_range(n.parse().ok()?)?),
                _ => return None,
            };
        }
        b't' if field.ty == FieldType::Boolean && c.literal(b"true") => *slot = Slot::Bool(true),
        b'f' if field.ty == FieldType::Boolean && c.literal(b"false") => *slot = Slot::Bool(false),
        b'n' if c.literal(b"null") => *slot = Slot::Null,
        _ => return None,
    }
    Some(())
}

/// Skips an undeclared field's value if it is a scalar this path understands.
fn skip_scalar<'a>(c: &mut Cursor<'a>, text: &'a str) -> Option<()> {
    match c.peek()? {
        b'"' => c.plain_string(text).map(drop),
        b'-' | b'0'..=b'9' => {
            let (n, _) = c.number(text)?;
            // 1e999 is valid JSON but not a finite number: let the full path judge it.
            n.parse::<f64>().ok().filter(|v| v.is_finite()).map(drop)
        }
        _ if c.literal(b"true") || c.literal(b"false") || c.literal(b"null") => Some(()),
        _ => None,
    }
}
