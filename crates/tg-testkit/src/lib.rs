//! The conformance suite every tg-pubsub backend runs.
//!
//! Tests are written once against [`Backend`]; each backend's `tests/conformance.rs` (a test
//! target with `harness = false`) hands its driver to [`Suite`] and calls [`Suite::run`]; the
//! suite connects through the driver with the settings of the environment (`REDIS_URL`, …), so it
//! runs against whatever server those name:
//!
//! ```no_run
//! fn main() -> std::process::ExitCode {
//!     tg_testkit::Suite::for_driver(&tg_backend_memory::DRIVER).run()
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

pub mod backlog;
pub mod bench;
mod cases;
mod check;
pub mod doc;
pub mod proxy;
#[cfg(feature = "pulsar-relay")]
pub mod pulsar_relay;
pub mod servers;
pub mod support;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use libtest_mimic::{Arguments, Failed, Trial};
use tg_backend_api::kit::Driver;
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
    driver: Option<&'static Driver>,
    page: Option<&'static str>,
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
            driver: None,
            page: None,
        }
    }

    /// A suite for the backend of `driver`, connected with the settings the environment gives
    /// (see [`driver_settings`]).
    pub fn for_driver(driver: &'static Driver) -> Self {
        Self::for_driver_with(driver, &[])
    }

    /// [`Suite::for_driver`] with URL options added to the backend's URL (a key prefix of this
    /// run, say).
    pub fn for_driver_with(driver: &'static Driver, url_options: &[(&str, &str)]) -> Self {
        let lookup = driver_settings(driver, url_options);
        let mut suite = Self::new(driver.name, move || {
            let lookup = lookup.clone();
            async move { driver.connect(&*lookup).await }
        });
        suite.driver = Some(driver);
        suite
    }

    /// Adds a test `documentation` that checks the backend's page in `docs/` (its text, usually
    /// `include_str!`) against the backend: see [`doc::check_page`].
    #[must_use]
    pub fn doc_page(mut self, page: &'static str) -> Self {
        self.page = Some(page);
        self
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
        if let Some(page) = self.page {
            let driver = self.driver;
            let skip = unreachable.is_some() && !in_ci;
            let unreachable = unreachable.clone();
            trials.push(
                Trial::test(format!("{}::documentation", self.backend), move || {
                    if let Some(why) = unreachable {
                        return Err(Failed::from(why));
                    }
                    doc::check_page(page, &caps, driver)
                        .map_err(|problems| Failed::from(problems.join("\n")))
                })
                .with_ignored_flag(skip),
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

/// Settings by environment name, as [`Driver::connect`] reads them.
pub type Lookup = Arc<dyn Fn(&str) -> Option<String> + Send + Sync>;

/// The settings of `driver` from the environment, with `url_options` appended to its URL setting
/// (whose value is the environment's or the setting's default). A lookup for
/// [`Driver::connect`].
pub fn driver_settings(driver: &'static Driver, url_options: &[(&str, &str)]) -> Lookup {
    let url_env = driver.url_setting().env;
    let url = std::env::var(url_env)
        .ok()
        .or_else(|| driver.url_setting().default.map(str::to_owned));
    let url = url.map(|url| {
        if url_options.is_empty() {
            return url;
        }
        let extra: Vec<String> = url_options
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}{}", extra.join("&"))
    });
    Arc::new(move |name: &str| {
        if name == url_env {
            url.clone()
        } else {
            std::env::var(name).ok()
        }
    })
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
