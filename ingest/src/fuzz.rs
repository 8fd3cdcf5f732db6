//! What the fuzz targets (`fuzz/`, cargo fuzz) run, here so that the corpus they keep
//! is replayed by an ordinary test on stable Rust (`tests::the_fuzz_corpus_replays`).

use std::sync::Arc;

use sluice_config::AclConfig;
use sluice_core::StreamSchema;

use crate::decode::{DecodeLimits, Decoder, MessageMeta};
use crate::mqtt::auth::{Acl, parse_connect, subscribe_filters};
use crate::mqtt::inspect::Inspector;
use crate::mqtt::v5;

/// Decodes `data` as one message of the telemetry stream, keyed from the topic, and
/// hands the batch on.
pub fn decode(data: &[u8]) {
    let Some(schema) = StreamSchema::builtin("telemetry") else {
        return;
    };
    let mut decoder = Decoder::new(
        schema,
        "telemetry",
        "fuzz",
        Some(1),
        DecodeLimits::default(),
    );
    let meta = MessageMeta {
        partition: "devices/d/telemetry",
        offset: "0",
        ingest_time_ms: 0,
        hops: 0,
        origin: None,
    };
    decoder.push(data, "devices/d/telemetry", &meta);
    let _ = decoder.flush();
}

/// Reads `data` as a device's byte stream at the broker's door: the first byte picks
/// the piece size; the rest goes through the CONNECT and SUBSCRIBE readers, the MQTT 5
/// CONNECT downgrade, and the inspector (payload limit 1 KB, an ACL with
/// `{client_id}`), once as it is and once behind the MQTT 5 translator; and, as if
/// rumqttd sent it, through the translator's way down.
pub fn door(data: &[u8]) {
    let Some((&step, stream)) = data.split_first() else {
        return;
    };
    let _ = parse_connect(stream);
    let _ = subscribe_filters(stream);
    let _ = v5::downgrade_connect(stream, Some("cn"));
    let acl = Arc::new(Acl::new(&AclConfig {
        publish: vec!["devices/{client_id}/#".into()],
        subscribe: vec!["commands/{client_id}".into()],
    }));
    let step = usize::from(step).max(1);
    let mut inspector = Inspector::new(1024).with_acl(acl.clone(), "d1".into());
    let mut out = Vec::new();
    for piece in stream.chunks(step) {
        if inspector.feed(piece, &mut out).is_err() {
            break;
        }
    }
    let mut inspector = Inspector::new(1024).with_acl(acl, "d1".into());
    let mut up = v5::Up::new(1024);
    let terms = v5::Terms {
        device_max_packet: Some(256),
        device_receive_max: Some(2),
        ..Default::default()
    };
    let mut down = up.down(terms, Some(inspector.denials()));
    let (mut translated, mut out, mut to_device) = (Vec::new(), Vec::new(), Vec::new());
    // Both ways a piece at a time, as the relay interleaves them: the way down first,
    // so that acknowledgements in the stream, fed up next, meet publishes it sent or
    // holds, and what they make room for is released.
    for piece in stream.chunks(step) {
        down.feed(piece, &mut to_device);
        translated.clear();
        if up.feed(piece, &mut translated).is_err()
            || inspector.feed(&translated, &mut out).is_err()
        {
            break;
        }
        down.release(&mut to_device);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// Every input the fuzzers kept (`fuzz/corpus/<target>/`) runs through its target
    /// again: what once crashed stays fixed.
    #[test]
    fn the_fuzz_corpus_replays() {
        let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
        let mut replayed = 0;
        for target in ["decode", "door", "config"] {
            let Ok(entries) = std::fs::read_dir(corpus.join(target)) else {
                panic!("no corpus for {target} under {}", corpus.display());
            };
            for entry in entries.flatten() {
                let data = std::fs::read(entry.path()).unwrap();
                match target {
                    "decode" => {
                        if let Ok(text) = std::str::from_utf8(&data) {
                            crate::decode::paths_agree(text)
                                .unwrap_or_else(|e| panic!("{}: {e}", entry.path().display()));
                        }
                        super::decode(&data);
                    }
                    "door" => super::door(&data),
                    _ => {
                        if let Ok(text) = std::str::from_utf8(&data) {
                            let _ = sluice_config::Config::from_toml(text);
                        }
                    }
                }
                replayed += 1;
            }
        }
        assert!(replayed >= 3, "the corpus is in the repository");
    }
}
