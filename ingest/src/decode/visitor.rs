//! The serde visitors that read one JSON object into the decoder's scratch row.
//!
//! Each visitor records *why* it refused a value in `failure` before returning a serde
//! error, so the decoder can dead-letter with a precise reason instead of parsing
//! serde's message.

use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use sluice_core::schema::{FieldSpec, FieldType};

use super::{Failure, Reason};

/// Largest event time accepted: 9999-12-31T23:59:59.999Z.
const MAX_TS_MS: i64 = 253_402_300_799_999;

/// One field of the scratch row. Strings live in the decoder's parallel text buffers
/// (`Str`), or, when the fast path found them unescaped, in the message itself (`Span`,
/// byte offsets), which saves a copy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Slot {
    Absent,
    Null,
    Str,
    Span(u32, u32),
    F64(f64),
    I64(i64),
    Bool(bool),
}

/// `ms` if it is a representable event time (1970-01-01 ..= 9999-12-31).
#[inline]
pub(super) fn timestamp_in_range(ms: i64) -> Option<i64> {
    (0..=MAX_TS_MS).contains(&ms).then_some(ms)
}

fn refuse<E: de::Error>(failure: &mut Option<Failure>, reason: Reason, detail: String) -> E {
    let error = E::custom(&detail);
    *failure = Some(Failure::new(reason, detail));
    error
}

/// Turns a serde_json error that no visitor classified into a reason.
pub(super) fn classify(error: &serde_json::Error, payload: &[u8]) -> Failure {
    let text = error.to_string();
    if text.contains("recursion limit exceeded") {
        return Failure::new(Reason::TooDeep, text);
    }
    if text.contains("number out of range") {
        return Failure::new(Reason::NonFiniteNumber, text);
    }
    if error.is_syntax() || error.is_eof() {
        // JavaScript and Python emit bare NaN / Infinity; name them for what they are.
        let at = byte_offset(payload, error.line(), error.column());
        let from = at.saturating_sub(2);
        let window = &payload[from.min(payload.len())..(at + 2).min(payload.len())];
        let non_finite = [b"NaN".as_slice(), b"Infinity", b"nan", b"inf"]
            .iter()
            .any(|token| (0..window.len()).any(|i| payload[from + i..].starts_with(token)));
        if non_finite {
            return Failure::new(
                Reason::NonFiniteNumber,
                format!("NaN or Infinity is not a JSON number ({text})"),
            );
        }
        return Failure::new(Reason::InvalidJson, text);
    }
    Failure::new(Reason::InvalidJson, text)
}

fn byte_offset(payload: &[u8], line: usize, column: usize) -> usize {
    let mut offset = 0;
    for _ in 1..line {
        match payload[offset..].iter().position(|&b| b == b'\n') {
            Some(p) => offset += p + 1,
            None => break,
        }
    }
    (offset + column).saturating_sub(1)
}

/// Reads the top-level object.
pub(super) struct RowSeed<'s> {
    pub(super) fields: &'s [FieldSpec],
    pub(super) slots: &'s mut [Slot],
    pub(super) texts: &'s mut [String],
    pub(super) failure: &'s mut Option<Failure>,
    pub(super) max_depth: usize,
}

impl<'de> DeserializeSeed<'de> for RowSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

macro_rules! not_an_object {
    ($($method:ident: $ty:ty),*) => {$(
        fn $method<E: de::Error>(self, _: $ty) -> Result<(), E> {
            Err(refuse(self.failure, Reason::NotAnObject, "the message is not a JSON object".into()))
        }
    )*};
}

impl<'de> Visitor<'de> for RowSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    not_an_object!(visit_bool: bool, visit_i64: i64, visit_u64: u64, visit_f64: f64, visit_str: &str);

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Err(refuse(
            self.failure,
            Reason::NotAnObject,
            "the message is not a JSON object".into(),
        ))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(refuse(
            self.failure,
            Reason::NotAnObject,
            "the message is a JSON array, not an object".into(),
        ))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(index) = map.next_key_seed(KeySeed(self.fields))? {
            match index {
                Some(i) => map.next_value_seed(ValueSeed {
                    field: &self.fields[i],
                    slot: &mut self.slots[i],
                    text: &mut self.texts[i],
                    failure: self.failure,
                })?,
                None => map.next_value_seed(Skip {
                    depth: 2,
                    max_depth: self.max_depth,
                    failure: self.failure,
                })?,
            }
        }
        Ok(())
    }
}

/// Maps a key to its field index without allocating (escaped keys are compared decoded).
struct KeySeed<'s>(&'s [FieldSpec]);

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = Option<usize>;
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Option<usize>, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed<'_> {
    type Value = Option<usize>;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a field name")
    }
    fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
        Ok(self.0.iter().position(|f| f.name == key))
    }
}

/// Reads one declared field's value into its slot.
struct ValueSeed<'s> {
    field: &'s FieldSpec,
    slot: &'s mut Slot,
    text: &'s mut String,
    failure: &'s mut Option<Failure>,
}

impl ValueSeed<'_> {
    fn wrong<E: de::Error>(self, found: &str) -> E {
        let reason = if self.field.ty == FieldType::Timestamp {
            Reason::BadTimestamp
        } else {
            Reason::WrongType
        };
        let detail = format!(
            "field \"{}\" should be {}, found {found}",
            self.field.name,
            self.field.ty.describe()
        );
        refuse(self.failure, reason, detail)
    }

    fn timestamp<E: de::Error>(self, ms: i64) -> Result<(), E> {
        if let Some(ms) = timestamp_in_range(ms) {
            *self.slot = Slot::I64(ms);
            Ok(())
        } else {
            let detail = format!(
                "field \"{}\" = {ms} ms is outside 1970-01-01..9999-12-31",
                self.field.name
            );
            Err(refuse(self.failure, Reason::BadTimestamp, detail))
        }
    }
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ValueSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.field.ty.describe())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        *self.slot = Slot::Null;
        Ok(())
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<(), E> {
        match self.field.ty {
            FieldType::Boolean => {
                *self.slot = Slot::Bool(v);
                Ok(())
            }
            _ => Err(self.wrong("a boolean")),
        }
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<(), E> {
        match self.field.ty {
            FieldType::Float64 => *self.slot = Slot::F64(v as f64),
            FieldType::Int64 => *self.slot = Slot::I64(v),
            FieldType::Timestamp => return self.timestamp(v),
            _ => return Err(self.wrong("a number")),
        }
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<(), E> {
        match (self.field.ty, i64::try_from(v)) {
            (FieldType::Float64, _) => {
                *self.slot = Slot::F64(v as f64);
                Ok(())
            }
            (FieldType::Int64 | FieldType::Timestamp, Ok(v)) => self.visit_i64(v),
            (FieldType::Int64, Err(_)) => Err(self.wrong("an integer above i64::MAX")),
            (FieldType::Timestamp, Err(_)) => Err(self.wrong("an out-of-range integer")),
            _ => Err(self.wrong("a number")),
        }
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        if !v.is_finite() {
            let detail = format!("field \"{}\" is not a finite number", self.field.name);
            return Err(refuse(self.failure, Reason::NonFiniteNumber, detail));
        }
        match self.field.ty {
            FieldType::Float64 => {
                *self.slot = Slot::F64(v);
                Ok(())
            }
            FieldType::Timestamp => self.timestamp(v as i64),
            _ => Err(self.wrong("a fractional number")),
        }
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<(), E> {
        match self.field.ty {
            FieldType::Utf8 => {
                self.text.clear();
                self.text.push_str(v);
                *self.slot = Slot::Str;
                Ok(())
            }
            FieldType::Timestamp => match chrono::DateTime::parse_from_rfc3339(v) {
                Ok(t) => self.timestamp(t.timestamp_millis()),
                Err(e) => {
                    let detail = format!(
                        "field \"{}\" = {v:?} is not an RFC 3339 timestamp ({e})",
                        self.field.name
                    );
                    Err(refuse(self.failure, Reason::BadTimestamp, detail))
                }
            },
            _ => Err(self.wrong("a string")),
        }
    }

    fn visit_seq<A: SeqAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.wrong("an array"))
    }

    fn visit_map<A: MapAccess<'de>>(self, _: A) -> Result<(), A::Error> {
        Err(self.wrong("an object"))
    }
}

/// Skips an undeclared field's value, refusing nesting beyond `max_depth`.
struct Skip<'s> {
    depth: usize,
    max_depth: usize,
    failure: &'s mut Option<Failure>,
}

impl Skip<'_> {
    fn nested(&mut self) -> Skip<'_> {
        Skip {
            depth: self.depth + 1,
            max_depth: self.max_depth,
            failure: self.failure,
        }
    }

    fn check<E: de::Error>(&mut self) -> Result<(), E> {
        if self.depth > self.max_depth {
            let detail = format!("nested deeper than {} levels", self.max_depth);
            return Err(refuse(self.failure, Reason::TooDeep, detail));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Skip<'_> {
    type Value = ();
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        // Not deserialize_ignored_any: serde_json skips that without visiting, so
        // nesting could not be counted.
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Skip<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<(), E> {
        if v.is_finite() {
            Ok(())
        } else {
            Err(refuse(
                self.failure,
                Reason::NonFiniteNumber,
                "a number is not finite".into(),
            ))
        }
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<(), A::Error> {
        self.check()?;
        while seq.next_element_seed(self.nested())?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<(), A::Error> {
        self.check()?;
        while map.next_key::<de::IgnoredAny>()?.is_some() {
            map.next_value_seed(self.nested())?;
        }
        Ok(())
    }
}
