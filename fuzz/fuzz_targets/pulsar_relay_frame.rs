//! Frames from a broker through the Pulsar checksum relay: whatever the bytes, never a panic;
//! a payload frame comes out checksummed once, with the checksum of what follows it, and a frame
//! that is not rewritten comes out unchanged.
#![no_main]

use std::borrow::Cow;

use libfuzzer_sys::fuzz_target;
use tg_testkit::pulsar_relay::{add_checksum, rewrite_frame, MAGIC_CRC32C};

const RELAY: &str = "pulsar://127.0.0.1:6650";

fuzz_target!(|body: &[u8]| {
    let once = add_checksum(body);
    // adding a checksum to what already has one changes nothing
    if let Cow::Owned(out) = &once {
        assert!(out.len() == body.len() + 6, "a checksum adds 6 bytes");
        let size = u32::from_be_bytes(body[..4].try_into().unwrap()) as usize;
        let at = 4 + size;
        assert_eq!(&out[at..at + 2], &MAGIC_CRC32C.to_be_bytes());
        let crc = u32::from_be_bytes(out[at + 2..at + 6].try_into().unwrap());
        assert_eq!(crc, crc32c::crc32c(&out[at + 6..]));
        assert!(matches!(add_checksum(out), Cow::Borrowed(_)));
    }
    let _ = rewrite_frame(body, RELAY);
});
