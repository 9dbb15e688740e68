//! The conformance suite on the in-memory backend (no server needed).

use std::process::ExitCode;
use std::sync::Arc;

use tg_backend_api::Backend;
use tg_backend_memory::MemoryBackend;

fn main() -> ExitCode {
    tg_testkit::Suite::new(MemoryBackend::NAME, || async {
        Ok(Arc::new(MemoryBackend::new()) as Arc<dyn Backend>)
    })
    .run()
}
