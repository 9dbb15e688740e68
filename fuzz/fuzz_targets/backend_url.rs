//! Backend URLs and their options through the kit's one configuration grammar: never a panic,
//! and an error never shows a password it was given.
#![no_main]

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tg_backend_api::kit::config::{self, parse_url};

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
#[allow(dead_code)] // read through Debug only
struct Options {
    #[serde(with = "config::duration")]
    connect_timeout: Duration,
    #[serde(with = "config::opt_duration")]
    lease: Option<Duration>,
    batch: usize,
    tls: bool,
    prefix: String,
}

fuzz_target!(|url: &str| {
    match parse_url::<Options>("Fuzz", &["fuzz", "fuzzs"], url) {
        Ok(parsed) => {
            let shown = format!("{parsed:?}");
            if let Some(password) = &parsed.password {
                let secret = password.expose();
                // The same text may be in the URL's other parts too (its path, say): only what
                // Debug shows beyond those parts would be the password.
                let mut others = parsed.clone();
                others.password = None;
                let elsewhere = format!("{others:?}").contains(secret);
                if secret.len() >= 4 && !elsewhere {
                    assert!(!shown.contains(secret), "Debug shows the password: {shown}");
                }
            }
        }
        Err(e) => {
            let _ = e.to_string();
        }
    }
    let _ = config::redact_url(url);
    let _ = tg_backend_memory::MemoryConfig::from_url(url);
});
