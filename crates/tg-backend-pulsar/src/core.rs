//! The state a Pulsar backend shares with its producers and consumers: the configuration, the two
//! client connections and the lifecycle.

use std::future::Future;
use std::time::Duration;

use pulsar::{
    Authentication, ConnectionRetryOptions, OperationRetryOptions, Pulsar, PulsarBuilder,
    TokioExecutor,
};
use tg_backend_api::kit::Lifecycle;
use tg_backend_api::{Error, ErrorKind, Result};

use crate::config::PulsarConfig;
use crate::error::{convert, kind_of};

/// One connected Pulsar backend.
pub(crate) struct Core {
    pub(crate) config: PulsarConfig,
    /// The service URL, for messages (never with the token).
    pub(crate) server: String,
    /// The client (connection) of producers.
    pub(crate) client: Pulsar<TokioExecutor>,
    /// The client (connection) of consumers.
    pub(crate) consumer_client: Pulsar<TokioExecutor>,
    pub(crate) life: Lifecycle,
}

impl Core {
    /// Opens both connections within `connect_timeout`.
    pub(crate) async fn connect(config: PulsarConfig) -> Result<Self> {
        config.validate()?;
        let server = config.service_url();
        if let Some(listener) = &config.listener {
            tracing::warn!(
                server = %server,
                listener = %listener,
                "PULSAR_LISTENER is set, but the pulsar crate cannot send a listener name in \
                 lookups: the broker answers with its default listener"
            );
        }
        // Two clients, so two connections: one for producers, one for consumers. The pulsar
        // crate does not set TCP_NODELAY, so a small write waits (Nagle) until the broker
        // acknowledged the previous one; consumer acknowledgements get no answer that would
        // carry that TCP acknowledgement, and on a shared connection they held sends back by up
        // to the broker's delayed-ACK time (40 ms on Linux). See docs/pulsar.md.
        let (producers, consumers) = (builder(&config, &server)?, builder(&config, &server)?);
        let timeout = config.connect_timeout;
        let both = async { futures::try_join!(producers.build(), consumers.build()) };
        let (client, consumer_client) = match tokio::time::timeout(timeout, both).await {
            Err(_) => {
                return Err(Error::connection(format!(
                    "no connection to Pulsar within {timeout:?}"
                ))
                .with_context("server", &server))
            }
            Ok(Err(e)) => {
                return Err(if kind_of(&e) == ErrorKind::Auth {
                    convert(e, "Pulsar refused the token", &server)
                } else {
                    Error::connection(format!("cannot connect to Pulsar: {e}"))
                        .with_context("server", &server)
                });
            }
            Ok(Ok(clients)) => clients,
        };
        tracing::debug!(server = %server, "connected to Pulsar");
        Ok(Self {
            config,
            server,
            client,
            consumer_client,
            life: Lifecycle::new("Pulsar backend"),
        })
    }

    pub(crate) fn err(&self, e: pulsar::Error, what: &str) -> Error {
        convert(e, what, &self.server)
    }

    /// Runs a broker operation, failing with `Timeout` after the operation timeout.
    pub(crate) async fn bounded<T>(
        &self,
        what: &str,
        fut: impl Future<Output = std::result::Result<T, pulsar::Error>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.config.operation_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.err(e, what)),
            Err(_) => Err(Error::new(
                ErrorKind::Timeout,
                format!(
                    "{what}: no answer from the broker within {:?}",
                    self.config.operation_timeout
                ),
            )
            .with_context("server", &self.server)),
        }
    }
}

/// A client builder with the configuration's timeouts, back-off, token and certificates.
fn builder(config: &PulsarConfig, server: &str) -> Result<PulsarBuilder<TokioExecutor>> {
    let mut builder = Pulsar::builder(server.to_owned(), TokioExecutor)
        .with_connection_retry_options(ConnectionRetryOptions {
            min_backoff: Duration::from_millis(100),
            max_backoff: config.reconnect_max,
            max_retries: u32::MAX,
            connection_timeout: config.connect_timeout,
            keep_alive: Duration::from_secs(30),
            ..ConnectionRetryOptions::default()
        })
        .with_operation_retry_options(OperationRetryOptions {
            operation_timeout: config.operation_timeout,
            retry_delay: Duration::from_millis(500),
            max_retries: None,
        })
        .with_outbound_channel_size(10_000);
    if let Some(token) = &config.token {
        builder = builder.with_auth(Authentication {
            name: "token".to_owned(),
            data: token.expose().as_bytes().to_vec(),
        });
    }
    if let Some(ca) = &config.ca_file {
        builder = builder.with_certificate_chain_file(ca).map_err(|e| {
            Error::config(format!("cannot read ca_file {}: {e}", ca.display()))
                .with_context("server", server)
        })?;
    }
    Ok(builder)
}
