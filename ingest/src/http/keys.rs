//! Idempotency keys of HTTP ingest (`Idempotency-Key: <key>` on
//! `POST /api/ingest/<stream>`): a client that sends a body again under a key the
//! stream has seen within `[http] idempotency_ttl` (it timed out, or lost the answer)
//! gets the first answer's report again, marked `duplicate`, and nothing is ingested
//! twice. The same key with a different body is refused: it is a client's bug.
//!
//! Each stream's task owns its table, so nothing here is shared or locked. The table
//! lives in memory and holds at most `[http] idempotency_keys` keys, the oldest
//! forgotten first. With a write-ahead log, a body's key is logged with it (in the
//! record's topic field), and a restart learns the keys of every body still in the
//! log again; before log segments are deleted, the table is saved beside them
//! ([`KEYS_FILE`]) and read back at start, so a key lasts its TTL across restarts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{self, BufRead, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{IngestError, IngestReport, Reply};
use crate::decode::Reason;

/// The file in a stream's log directory holding the keys of bodies whose segments
/// were deleted: one JSON object per line.
pub(super) const KEYS_FILE: &str = "idempotency-keys.jsonl";

/// Longest key taken, in bytes (the header's value).
pub const MAX_KEY_LEN: usize = 255;

/// A request's idempotency key and its body's checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey {
    key: String,
    /// CRC-32 of the body: the same key with another body is refused.
    body_crc: u32,
}

impl IdempotencyKey {
    /// `key` for `body`, if it is 1 to [`MAX_KEY_LEN`] visible ASCII characters.
    pub fn new(key: &str, body: &[u8]) -> Result<Self, IngestError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(IngestError::BadKey);
        }
        Ok(Self {
            key: key.to_owned(),
            body_crc: crc32fast::hash(body),
        })
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.key
    }
}

/// What became of a key's first body.
#[derive(Debug)]
enum Outcome {
    /// Not answered yet (waiting for the log's fsync); these requests sent it again
    /// meanwhile and get its report too.
    Pending(Vec<Reply>),
    Done(IngestReport),
}

#[derive(Debug)]
struct Seen {
    body_crc: u32,
    at_ms: i64,
    outcome: Outcome,
}

/// One stream's keys, newest last.
pub(super) struct Keys {
    ttl_ms: i64,
    cap: usize,
    /// `sluice_http_ingest_keys_total` by outcome: `duplicate`, `reused`.
    duplicates: metrics::Counter,
    reused: metrics::Counter,
    seen: HashMap<String, Seen>,
    /// Keys by arrival, for forgetting: a key met again after it was forgotten has
    /// a later entry here, so an entry whose time differs from its key's is stale.
    order: VecDeque<(i64, String)>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keys")
            .field("ttl_ms", &self.ttl_ms)
            .field("keys", &self.seen.len())
            .finish_non_exhaustive()
    }
}

impl Keys {
    /// The table of stream task `component` (for metrics), forgetting keys `ttl_ms`
    /// after their first body, holding at most `cap`.
    pub(super) fn new(component: &str, ttl_ms: i64, cap: usize) -> Self {
        let counter = |outcome: &'static str| metrics::counter!("sluice_http_ingest_keys_total", "component" => component.to_owned(), "outcome" => outcome);
        Self {
            ttl_ms,
            cap,
            duplicates: counter("duplicate"),
            reused: counter("reused"),
            seen: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// Keys known.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.seen.len()
    }

    /// Takes a request with `key` arriving at `now_ms`. A new key's body must `pass`
    /// (the rate limits): if it does, the key is noted as pending and its `reply`
    /// handed back, and the caller ingests the body and calls [`done`](Self::done); if
    /// not, the request is answered with the refusal and the key stays unknown. A known
    /// key's request is answered here (the stored report, or
    /// [`IngestError::KeyReused`] for another body) or, while its first body is not
    /// answered yet, waits for that answer.
    pub(super) fn admit(
        &mut self,
        key: &IdempotencyKey,
        now_ms: i64,
        reply: Reply,
        pass: impl FnOnce() -> Result<(), IngestError>,
    ) -> Option<Reply> {
        self.forget(now_ms);
        let Some(seen) = self.seen.get_mut(&key.key) else {
            if let Err(refused) = pass() {
                let _ = reply.send(Err(refused));
                return None;
            }
            self.note(key, now_ms, Outcome::Pending(Vec::new()));
            self.forget(now_ms);
            return Some(reply);
        };
        if seen.body_crc != key.body_crc {
            self.reused.increment(1);
            let _ = reply.send(Err(IngestError::KeyReused));
            return None;
        }
        self.duplicates.increment(1);
        match &mut seen.outcome {
            Outcome::Pending(waiting) => waiting.push(reply),
            Outcome::Done(report) => {
                let _ = reply.send(Ok(duplicate(report)));
            }
        }
        None
    }

    /// Records the report of `key`'s first body and answers the requests that sent
    /// it again meanwhile.
    pub(super) fn done(&mut self, key: &str, report: &IngestReport) {
        let Some(seen) = self.seen.get_mut(key) else {
            return;
        };
        let outcome = std::mem::replace(&mut seen.outcome, Outcome::Done(report.clone()));
        if let Outcome::Pending(waiting) = outcome {
            for reply in waiting {
                let _ = reply.send(Ok(duplicate(report)));
            }
        }
    }

    /// Learns `key` again from the write-ahead log at a restart: its body arrived at
    /// `at_ms` and was answered with `report`.
    pub(super) fn restore(
        &mut self,
        key: &IdempotencyKey,
        at_ms: i64,
        report: IngestReport,
        now_ms: i64,
    ) {
        if at_ms.saturating_add(self.ttl_ms) <= now_ms {
            return;
        }
        self.seen.remove(&key.key);
        self.note(key, at_ms, Outcome::Done(report));
        self.forget(now_ms);
    }

    fn note(&mut self, key: &IdempotencyKey, at_ms: i64, outcome: Outcome) {
        self.seen.insert(
            key.key.clone(),
            Seen {
                body_crc: key.body_crc,
                at_ms,
                outcome,
            },
        );
        self.order.push_back((at_ms, key.key.clone()));
    }

    /// Forgets keys older than the TTL, then the oldest while over the cap. A key
    /// whose first body is not answered yet is kept (its senders wait on it).
    fn forget(&mut self, now_ms: i64) {
        while let Some((at_ms, key)) = self.order.front() {
            let (at_ms, expired) = (*at_ms, at_ms.saturating_add(self.ttl_ms) <= now_ms);
            if !expired && self.seen.len() <= self.cap {
                break;
            }
            match self.seen.get(key) {
                Some(seen) if seen.at_ms == at_ms => {
                    if matches!(seen.outcome, Outcome::Pending(_)) {
                        break;
                    }
                    self.seen.remove(key);
                }
                // A stale entry: its key was forgotten, or met again since.
                _ => {}
            }
            self.order.pop_front();
        }
    }
}

/// A key and its answer as [`KEYS_FILE`] holds them.
#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    key: String,
    body_crc: u32,
    at_ms: i64,
    accepted: u64,
    dead_lettered: u64,
    reasons: BTreeMap<String, u64>,
}

impl Keys {
    /// Writes the answered keys to `path` atomically (a temporary file, fsynced, then
    /// renamed over it, and the directory fsynced).
    pub(super) fn save(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("tmp");
        let mut out = io::BufWriter::new(std::fs::File::create(&tmp)?);
        for (key, seen) in &self.seen {
            let Outcome::Done(report) = &seen.outcome else {
                continue;
            };
            let saved = Saved {
                key: key.clone(),
                body_crc: seen.body_crc,
                at_ms: seen.at_ms,
                accepted: report.accepted,
                dead_lettered: report.dead_lettered,
                reasons: (report.reasons.iter())
                    .map(|(r, n)| ((*r).to_owned(), *n))
                    .collect(),
            };
            serde_json::to_writer(&mut out, &saved)?;
            out.write_all(b"\n")?;
        }
        out.into_inner()
            .map_err(io::IntoInnerError::into_error)?
            .sync_all()?;
        std::fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Learns the keys [`save`](Self::save) wrote to `path` (none if there is no such
    /// file) that are within their TTL at `now_ms`. Returns how many.
    pub(super) fn load(&mut self, path: &Path, now_ms: i64) -> io::Result<usize> {
        let file = match std::fs::File::open(path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(e),
        };
        let mut saved: Vec<Saved> = Vec::new();
        for line in io::BufReader::new(file).lines() {
            saved.push(serde_json::from_str(&line?)?);
        }
        // Oldest first, as the table keeps them.
        saved.sort_by_key(|s| s.at_ms);
        let before = self.seen.len();
        for s in saved {
            let report = IngestReport {
                accepted: s.accepted,
                dead_lettered: s.dead_lettered,
                reasons: (s.reasons.iter())
                    .filter_map(|(code, n)| Some((Reason::from_code(code)?.code(), *n)))
                    .collect(),
                duplicate: false,
            };
            let key = IdempotencyKey {
                key: s.key,
                body_crc: s.body_crc,
            };
            self.restore(&key, s.at_ms, report, now_ms);
        }
        Ok(self.seen.len() - before)
    }
}

fn duplicate(report: &IngestReport) -> IngestReport {
    IngestReport {
        duplicate: true,
        ..report.clone()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;

    fn key(text: &str, body: &str) -> IdempotencyKey {
        IdempotencyKey::new(text, body.as_bytes()).expect("key")
    }

    fn report(accepted: u64) -> IngestReport {
        IngestReport {
            accepted,
            ..IngestReport::default()
        }
    }

    /// Admits `key` at `now`: `None` if it is new, else what the request was answered.
    fn admit(
        keys: &mut Keys,
        key: &IdempotencyKey,
        now: i64,
    ) -> Option<Result<IngestReport, IngestError>> {
        admit_past(keys, key, now, Ok(()))
    }

    /// [`admit`] with limits that answer `limits` to a new key.
    fn admit_past(
        keys: &mut Keys,
        key: &IdempotencyKey,
        now: i64,
        limits: Result<(), IngestError>,
    ) -> Option<Result<IngestReport, IngestError>> {
        let (reply, mut answer) = oneshot::channel();
        match keys.admit(key, now, reply, || limits) {
            Some(_) => None,
            None => Some(answer.try_recv().expect("answered at once")),
        }
    }

    #[test]
    fn a_key_is_visible_ascii_of_at_most_255_bytes() {
        for bad in ["", "a b", "é", &"k".repeat(256), "tab\t"] {
            assert_eq!(
                IdempotencyKey::new(bad, b"x"),
                Err(IngestError::BadKey),
                "{bad:?}"
            );
        }
        assert!(IdempotencyKey::new(&"k".repeat(255), b"x").is_ok());
        assert!(IdempotencyKey::new("8e03978e-40d5-43e8-bc93-6894a57f9324", b"x").is_ok());
    }

    #[test]
    fn a_known_key_gets_the_first_report_marked_duplicate_and_another_body_is_refused() {
        let mut keys = Keys::new("test", 60_000, 10);
        assert_eq!(admit(&mut keys, &key("a", "body"), 0), None);
        keys.done("a", &report(3));
        let again = admit(&mut keys, &key("a", "body"), 1).expect("known");
        assert_eq!(
            again,
            Ok(IngestReport {
                duplicate: true,
                ..report(3)
            })
        );
        assert_eq!(
            admit(&mut keys, &key("a", "other"), 2),
            Some(Err(IngestError::KeyReused))
        );
        assert_eq!(
            admit(&mut keys, &key("b", "body"), 3),
            None,
            "another key is new"
        );
    }

    #[test]
    fn only_a_new_key_passes_the_limits_and_a_refused_one_stays_unknown() {
        let mut keys = Keys::new("test", 60_000, 10);
        let wait = Duration::from_secs(1);
        let limited = || Err(IngestError::RateLimited(wait));
        assert_eq!(
            admit_past(&mut keys, &key("a", "body"), 0, limited()),
            Some(Err(IngestError::RateLimited(wait)))
        );
        assert_eq!(keys.len(), 0, "a refused key is not noted");
        assert_eq!(admit_past(&mut keys, &key("a", "body"), 1, Ok(())), None);
        keys.done("a", &report(2));
        assert_eq!(
            admit_past(&mut keys, &key("a", "body"), 2, limited()),
            Some(Ok(IngestReport {
                duplicate: true,
                ..report(2)
            })),
            "a duplicate is answered however full the limits are"
        );
    }

    #[test]
    fn a_key_sent_again_before_its_first_answer_waits_for_it() {
        let mut keys = Keys::new("test", 60_000, 10);
        assert_eq!(admit(&mut keys, &key("a", "body"), 0), None);
        let (reply, mut answer) = oneshot::channel();
        assert!(keys.admit(&key("a", "body"), 1, reply, || Ok(())).is_none());
        assert!(answer.try_recv().is_err(), "not answered before the first");
        keys.done("a", &report(2));
        assert_eq!(
            answer.try_recv().expect("answered"),
            Ok(IngestReport {
                duplicate: true,
                ..report(2)
            })
        );
    }

    #[test]
    fn keys_are_forgotten_after_the_ttl_and_the_oldest_first_over_the_cap() {
        let mut keys = Keys::new("test", 1_000, 2);
        for (k, at) in [("a", 0), ("b", 500)] {
            assert_eq!(admit(&mut keys, &key(k, "x"), at), None);
            keys.done(k, &report(1));
        }
        assert!(
            admit(&mut keys, &key("a", "x"), 999).is_some(),
            "within the TTL"
        );
        assert_eq!(
            admit(&mut keys, &key("a", "x"), 1_000),
            None,
            "past it: new again"
        );
        keys.done("a", &report(1));
        // b (at 500) and a (at 1,000); c makes three, over the cap of two: b goes.
        assert_eq!(admit(&mut keys, &key("c", "x"), 1_001), None);
        keys.done("c", &report(1));
        assert_eq!(keys.len(), 2);
        assert!(
            admit(&mut keys, &key("a", "x"), 1_002).is_some(),
            "a is kept"
        );
        assert_eq!(
            admit(&mut keys, &key("b", "x"), 1_003),
            None,
            "b was forgotten"
        );
    }

    #[test]
    fn a_key_not_answered_yet_is_kept_over_the_cap() {
        let mut keys = Keys::new("test", 1_000, 1);
        assert_eq!(admit(&mut keys, &key("a", "x"), 0), None);
        assert_eq!(admit(&mut keys, &key("b", "x"), 1), None);
        assert_eq!(keys.len(), 2, "a waits for its answer");
        keys.done("a", &report(1));
        keys.done("b", &report(1));
        assert!(
            admit(&mut keys, &key("b", "x"), 2).is_some(),
            "b, the newest, is kept"
        );
        assert_eq!(admit(&mut keys, &key("c", "x"), 3), None);
        assert_eq!(keys.len(), 1, "c alone: a, then b forgotten");
    }

    #[test]
    fn saved_keys_are_read_back_within_their_ttl() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(KEYS_FILE);
        let mut keys = Keys::new("test", 1_000, 10);
        assert_eq!(keys.load(&path, 0).expect("no file yet"), 0);
        for (k, at) in [("a", 100), ("c", 900), ("b", 950)] {
            assert_eq!(admit(&mut keys, &key(k, "x"), at), None);
        }
        keys.done("c", &report(5));
        let mut dead = report(1);
        dead.dead_lettered = 2;
        dead.reasons.insert(Reason::InvalidJson.code(), 2);
        keys.done("b", &dead);
        keys.save(&path).expect("save");

        // a was never answered (so it is not saved); c is past its TTL at 1,900.
        let mut again = Keys::new("test", 1_000, 10);
        assert_eq!(again.load(&path, 1_899).expect("load"), 2);
        let mut later = Keys::new("test", 1_000, 10);
        assert_eq!(later.load(&path, 1_900).expect("load"), 1);
        let b = admit(&mut later, &key("b", "x"), 1_900).expect("known");
        assert_eq!(
            b,
            Ok(IngestReport {
                duplicate: true,
                ..dead
            })
        );
        assert_eq!(
            admit(&mut later, &key("b", "y"), 1_900),
            Some(Err(IngestError::KeyReused))
        );
    }

    #[test]
    fn a_restored_key_answers_as_if_never_restarted_unless_past_its_ttl() {
        let mut keys = Keys::new("test", 1_000, 10);
        keys.restore(&key("a", "x"), 500, report(4), 1_000);
        keys.restore(&key("old", "x"), 0, report(4), 1_000);
        assert_eq!(keys.len(), 1);
        assert_eq!(
            admit(&mut keys, &key("a", "x"), 1_100),
            Some(Ok(IngestReport {
                duplicate: true,
                ..report(4)
            }))
        );
        assert_eq!(admit(&mut keys, &key("old", "x"), 1_100), None);
    }
}
