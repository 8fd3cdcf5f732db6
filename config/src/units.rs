//! Human-friendly units in config files: durations like `"50ms"` or `"5s"` (parsed by
//! humantime) and sizes like `"64KB"`, `"128MB"` or `"1GiB"`.

use std::fmt;

use serde::{Deserialize, Deserializer, de};

/// A duration written as `"250ms"`, `"5s"`, `"1m"`, `"1h 30m"`. Default: zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// From milliseconds.
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }
    /// From seconds.
    pub const fn from_secs(s: u64) -> Self {
        Self(std::time::Duration::from_secs(s))
    }
}

/// The longest duration a setting takes: 100 years.
pub const MAX_DURATION: Duration = Duration::from_secs(100 * 365 * 86_400);

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let d = humantime::parse_duration(&text).map_err(|e| {
            de::Error::custom(format!("{text:?} is not a duration like \"5s\" ({e})"))
        })?;
        // Longer would overflow deadlines (`Instant` + it) and times in milliseconds
        // (a retention cut-off before 1970 would keep nothing).
        if d > MAX_DURATION.0 {
            return Err(de::Error::custom(format!(
                "{text:?} is longer than {MAX_DURATION}, the longest duration a setting takes"
            )));
        }
        Ok(Duration(d))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

/// A size in bytes written as `"512"`, `"64KB"`, `"128MB"`, `"1GiB"` (KB = 1000, KiB = 1024).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses a size. A few lines here rather than a crate: only these suffixes exist.
    pub fn parse(text: &str) -> Option<Self> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits.parse().ok()?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" | "k" => 1_000,
            "kib" => 1 << 10,
            "mb" | "m" => 1_000_000,
            "mib" => 1 << 20,
            "gb" | "g" => 1_000_000_000,
            "gib" => 1 << 30,
            _ => return None,
        };
        n.checked_mul(mult).map(ByteSize)
    }

    /// As a `usize`, saturating.
    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(t) => ByteSize::parse(&t).ok_or_else(|| {
                de::Error::custom(format!("{t:?} is not a size like \"64KB\" or \"128MB\""))
            }),
        }
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(ByteSize::parse("64KB"), Some(ByteSize(64_000)));
        assert_eq!(ByteSize::parse("1GiB"), Some(ByteSize(1 << 30)));
        assert_eq!(ByteSize::parse("12"), Some(ByteSize(12)));
        assert_eq!(ByteSize::parse("12 mb"), Some(ByteSize(12_000_000)));
        assert_eq!(ByteSize::parse("lots"), None);
        assert_eq!(ByteSize::parse("99999999999999999999GB"), None);
    }

    #[test]
    fn durations_parse() {
        let d: Duration = toml::Value::String("250ms".into())
            .try_into()
            .expect("parse");
        assert_eq!(d, Duration::from_millis(250));
        let bad: Result<Duration, _> = toml::Value::String("soon".into()).try_into();
        assert!(bad.is_err());
    }
}
