//! Fuzz target: any bytes from a client through frame splitting and decoding.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    shardgate::protocol::decode_client_bytes(data, 1 << 16);
});
