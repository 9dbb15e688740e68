//! The conformance suite every tg-pubsub backend runs.
//!
//! Tests are written once against [`Backend`]; each backend's `tests/conformance.rs` (a test
//! target with `harness = false`) hands a factory to [`Suite`] and calls [`Suite::run`]:
//!
//! ```no_run
//! use std::sync::Arc;
//! use tg_testkit::Suite;
//!
//! fn main() -> std::process::ExitCode {
//!     Suite::new("memory", || async {
//!         Ok(Arc::new(tg_backend_memory::MemoryBackend::new()) as Arc<dyn tg_backend_api::Backend>)
//!     })
//!     .run()
//! }
//! ```
//!
//! Each test runs on a fresh backend and a fresh random tenant/namespace, so runs never see each
//! other's messages. A test the backend's [`Capabilities`] rule out is reported as ignored with
//! the reason; so is a test listed as a known defect of the server ([`Suite::known_defect`]).
//! When the factory cannot reach the server, every test is ignored with the reason printed —
//! unless `CI=true`, where that is a failure.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod bench;
mod cases;
mod check;
pub mod servers;
pub mod support;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use libtest_mimic::{Arguments, Failed, Trial};
use tg_backend_api::{Backend, Capabilities, Qos, Result};

pub use check::{Ctx, TestResult};

/// Builds a fresh backend for one test.
pub type Factory = Arc<dyn Fn() -> BoxFuture<'static, Result<Arc<dyn Backend>>> + Send + Sync>;

/// How long one test may take before it fails.
pub const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// The conformance suite for one backend.
pub struct Suite {
    backend: String,
    factory: Factory,
    defects: Vec<(&'static str, String)>,
}

impl Suite {
    /// A suite for backend `name`, whose tests get their backend from `factory`.
    pub fn new<F, Fut>(name: impl Into<String>, factory: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Arc<dyn Backend>>> + Send + 'static,
    {
        Self {
            backend: name.into(),
            factory: Arc::new(move || Box::pin(factory())),
            defects: Vec::new(),
        }
    }

    /// Skips test `test` because the server has a known defect; `evidence` says which and how it
    /// shows. Listed in the output, never hidden.
    #[must_use]
    pub fn known_defect(mut self, test: &'static str, evidence: impl Into<String>) -> Self {
        self.defects.push((test, evidence.into()));
        self
    }

    /// The names of every test in the suite.
    pub fn test_names() -> Vec<&'static str> {
        cases::all().iter().map(|c| c.name).collect()
    }

    /// Runs the suite with libtest-style arguments from the command line; ends with a line
    /// `N passed, N failed, N skipped`.
    pub fn run(self) -> ExitCode {
        let args = Arguments::from_args();
        let in_ci = support::in_ci();
        let runtime = runtime();
        let probe = runtime.block_on(async {
            let backend = (self.factory)().await?;
            let caps = Qos::ALL.map(|q| backend.capabilities(q));
            let _ = backend.close().await;
            Ok::<_, tg_backend_api::Error>(caps)
        });
        let unreachable = match &probe {
            Ok(_) => None,
            Err(e) => {
                let why = format!("backend {} could not be built: {e}", self.backend);
                if in_ci {
                    eprintln!("error: {why} (CI=true: every test fails)");
                } else {
                    eprintln!("warning: {why} — every conformance test is skipped (set CI=true to make this a failure)");
                }
                Some(why)
            }
        };
        let caps = probe.unwrap_or([Capabilities::NONE; 3]);

        let mut trials = Vec::new();
        let mut notes = Vec::new();
        for case in cases::all() {
            let name = format!("{}::{}", self.backend, case.name);
            let case_caps = caps[case.qos.level() as usize];
            let skip = if let Some(why) = &unreachable {
                (!in_ci).then(|| why.clone())
            } else if let Some((_, evidence)) = self.defects.iter().find(|(t, _)| *t == case.name) {
                Some(format!("known server defect: {evidence}"))
            } else {
                (case.needs)(&case_caps)
                    .err()
                    .map(|r| format!("backend lacks: {r}"))
            };
            if let Some(reason) = &skip {
                notes.push(format!("skipped {name}: {reason}"));
            }
            let factory = self.factory.clone();
            let unreachable = unreachable.clone();
            let run = case.run;
            let qos = case.qos;
            let test_name = case.name;
            trials.push(
                Trial::test(name, move || {
                    if let Some(why) = unreachable {
                        return Err(Failed::from(why));
                    }
                    runtime_for_test().block_on(async move {
                        let backend = factory().await.map_err(|e| Failed::from(e.to_string()))?;
                        let ctx = Ctx::new(backend.clone(), case_caps, qos, test_name);
                        let outcome = tokio::time::timeout(TEST_TIMEOUT, run(ctx)).await;
                        let _ = backend.close().await;
                        match outcome {
                            Ok(result) => result.map_err(|f| Failed::from(f.to_string())),
                            Err(_) => {
                                Err(Failed::from(format!("timed out after {TEST_TIMEOUT:?}")))
                            }
                        }
                    })
                })
                .with_ignored_flag(skip.is_some()),
            );
        }
        for note in &notes {
            println!("{note}");
        }
        let conclusion = libtest_mimic::run(&args, trials);
        println!(
            "conformance({}): {} passed, {} failed, {} skipped",
            self.backend,
            conclusion.num_passed,
            conclusion.num_failed,
            conclusion.num_ignored + conclusion.num_filtered_out
        );
        if conclusion.has_failed() {
            ExitCode::FAILURE
        } else {
            ExitCode::SUCCESS
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn runtime_for_test() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// One conformance test.
pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) qos: Qos,
    pub(crate) needs: fn(&Capabilities) -> std::result::Result<(), &'static str>,
    pub(crate) run: fn(Ctx) -> BoxFuture<'static, TestResult>,
}
