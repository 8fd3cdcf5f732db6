//! The JSON decoder: its fast path and serde_json must agree on every input, and
//! decoding any bytes must not panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Err(disagreement) = sluice_ingest::decode::paths_agree(text)
    {
        panic!("{disagreement}");
    }
    sluice_ingest::fuzz::decode(data);
});
