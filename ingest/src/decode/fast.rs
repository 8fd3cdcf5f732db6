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

/// A scanned JSON number.
struct Number<'a> {
    text: &'a str,
    negative: bool,
    /// No fraction and no exponent.
    integer: bool,
    /// `mantissa` holds every digit (there are at most 19).
    exact: bool,
    digits: usize,
    mantissa: u64,
    exp10: i32,
}

/// 10^0 ..= 10^22: every one is exactly representable as an f64.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
    1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

impl Number<'_> {
    /// The value as a finite f64, correctly rounded. Short decimals take Clinger's fast
    /// path (an exact mantissa times or over an exact power of ten is one correctly
    /// rounded operation); anything else goes to the standard library's parser.
    #[inline]
    fn to_f64(&self) -> Option<f64> {
        let v = if self.exact && self.mantissa <= 1 << 53 && (-22..=22).contains(&self.exp10) {
            let m = self.mantissa as f64;
            let p = POW10[self.exp10.unsigned_abs() as usize];
            let v = if self.exp10 >= 0 { m * p } else { m / p };
            if self.negative { -v } else { v }
        } else {
            self.text.parse().ok()?
        };
        v.is_finite().then_some(v)
    }

    /// The value as an i64, if it is an integer literal in range.
    #[inline]
    fn to_i64(&self) -> Option<i64> {
        if !self.integer {
            return None;
        }
        match i64::try_from(self.mantissa) {
            Ok(m) if self.exact => Some(if self.negative { -m } else { m }),
            _ => self.text.parse().ok(),
        }
    }
}

/// Bytes that end the plain part of a string: the quote, a backslash, control characters.
/// A table lookup per byte is about half the cost of three comparisons (callgrind).
const STRING_STOP: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

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
        let mut end = start;
        while let Some(&b) = self.bytes.get(end) {
            if STRING_STOP[b as usize] {
                break;
            }
            end += 1;
        }
        if self.bytes.get(end) != Some(&b'"') {
            return None;
        }
        let len = end - start;
        self.at = end + 1;
        // `text` is valid UTF-8 and the quotes are ASCII, so this slice is on boundaries.
        text.get(start..start + len)
    }

    /// A JSON number, read in one pass: its text plus, when it has at most 19
    /// significant digits, its decimal mantissa and exponent.
    #[inline]
    fn number(&mut self, text: &'a str) -> Option<Number<'a>> {
        let start = self.at;
        let negative = self.eat(b'-');
        let mut n = Number {
            text: "",
            negative,
            integer: true,
            exact: true,
            digits: 0,
            mantissa: 0,
            exp10: 0,
        };
        match self.peek() {
            Some(b'0') => self.at += 1,
            Some(b'1'..=b'9') => {
                self.digits(&mut n);
            }
            _ => return None,
        }
        if self.eat(b'.') {
            n.integer = false;
            let fraction = self.digits(&mut n);
            if fraction == 0 {
                return None;
            }
            n.exp10 = -i32::try_from(fraction).unwrap_or(i32::MAX);
        }
        if matches!(self.peek(), Some(b'e' | b'E')) {
            n.integer = false;
            self.at += 1;
            let minus = if self.eat(b'-') {
                true
            } else {
                self.eat(b'+');
                false
            };
            let from = self.at;
            let mut e: i32 = 0;
            while let Some(d @ b'0'..=b'9') = self.peek() {
                e = e.saturating_mul(10).saturating_add(i32::from(d - b'0'));
                self.at += 1;
            }
            if self.at == from {
                return None;
            }
            n.exp10 = n.exp10.saturating_add(if minus { -e } else { e });
        }
        n.text = text.get(start..self.at)?;
        Some(n)
    }

    /// Reads a run of digits into `n`'s mantissa; returns how many there were.
    /// Past 19 digits the mantissa could overflow, so the number is marked inexact
    /// (and later parsed by the standard library) instead of checking every step.
    #[inline]
    fn digits(&mut self, n: &mut Number<'_>) -> usize {
        let from = self.at;
        let mut at = from;
        let mut m = n.mantissa;
        while let Some(&b) = self.bytes.get(at) {
            let d = b.wrapping_sub(b'0');
            if d > 9 {
                break;
            }
            m = m.wrapping_mul(10).wrapping_add(u64::from(d));
            at += 1;
        }
        let count = at - from;
        n.digits += count;
        n.exact &= n.digits <= 19;
        n.mantissa = m;
        self.at = at;
        count
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
            let n = c.number(text)?;
            *slot = match field.ty {
                FieldType::Float64 => Slot::F64(n.to_f64()?),
                FieldType::Int64 => Slot::I64(n.to_i64()?),
                FieldType::Timestamp => Slot::I64(timestamp_in_range(n.to_i64()?)?),
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
            // 1e999 is valid JSON but not a finite number: let the full path judge it.
            c.number(text)?.to_f64().map(drop)
        }
        _ if c.literal(b"true") || c.literal(b"false") || c.literal(b"null") => Some(()),
        _ => None,
    }
}
