//! The SQL gate of `POST /api/query`: any text is one read-only query or a refusal,
//! never a panic or a stack overflow.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(sql) = std::str::from_utf8(data) {
        let _ = sluice_sqlgate::read_only_statement(sql);
    }
});
