//! Arbitrary text as the configuration file: parsing and validation never panic; a file is
//! either a config that validates, or an error that names what is wrong.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match eventstream::ops::config::Config::parse(text, "fuzz.yaml") {
        Ok(cfg) => assert!(cfg.validate().is_ok()),
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
