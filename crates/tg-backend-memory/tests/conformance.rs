//! The conformance suite on the in-memory backend (no server needed), and its page in `docs/`.

fn main() -> std::process::ExitCode {
    tg_testkit::Suite::for_driver(&tg_backend_memory::DRIVER)
        .doc_page(include_str!("../../../docs/memory.md"))
        .run()
}
