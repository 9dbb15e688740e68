//! Message payloads decoded as every generated framework type: never a panic, and what decodes
//! encodes, and decodes again to the same JSON.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tg_schema::trustgraph::{reencode, PYTHON_NAMES};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, payload)) = data.split_first() else {
        return;
    };
    let name = PYTHON_NAMES[usize::from(pick) % PYTHON_NAMES.len()];
    if let Some(Ok(once)) = reencode(name, payload) {
        let twice = reencode(name, &once)
            .expect("the type exists")
            .expect("what we encoded decodes");
        assert_eq!(once, twice, "{name}: encode(decode(x)) is not stable");
    }
});
