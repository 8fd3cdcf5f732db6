//! The config loader: any text is a config or a list of problems, never a panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = sluice_config::Config::from_toml(text);
    }
});
