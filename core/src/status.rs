//! The last error of each component (a source's broker gone, a stream that cannot be
//! read), for the console's sources table: set when an outage starts, cleared when
//! it ends. Metrics count errors; this keeps the words.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

/// A component's current trouble.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trouble {
    /// What went wrong, as the log said it.
    pub error: String,
    /// Since when (ms since the epoch).
    pub since_ms: i64,
}

fn troubles() -> &'static Mutex<BTreeMap<String, Trouble>> {
    static TROUBLES: OnceLock<Mutex<BTreeMap<String, Trouble>>> = OnceLock::new();
    TROUBLES.get_or_init(Default::default)
}

/// `component` is in trouble: `error`, since now (kept from the first report of an
/// outage; the words follow the latest).
pub fn set_error(component: &str, error: impl std::fmt::Display) {
    let now = crate::Clock::now_ms(&crate::SystemClock);
    let mut map = troubles().lock().unwrap_or_else(|e| e.into_inner());
    let since_ms = map.get(component).map_or(now, |t| t.since_ms);
    map.insert(
        component.to_owned(),
        Trouble {
            error: error.to_string(),
            since_ms,
        },
    );
}

/// `component` works again.
pub fn clear_error(component: &str) {
    troubles()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(component);
}

/// Every component in trouble now.
pub fn errors() -> BTreeMap<String, Trouble> {
    troubles().lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outage_keeps_its_start_and_ends_when_cleared() {
        set_error("status-test", "first");
        let first = errors()["status-test"].clone();
        set_error("status-test", "second");
        let now = errors()["status-test"].clone();
        assert_eq!(now.error, "second");
        assert_eq!(now.since_ms, first.since_ms);
        clear_error("status-test");
        assert!(!errors().contains_key("status-test"));
    }
}
