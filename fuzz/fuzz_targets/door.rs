//! The broker door: any byte stream from a device, fed in any pieces, through the
//! CONNECT reader and the packet inspector (with an ACL), must not panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice_ingest::fuzz::door(data));
