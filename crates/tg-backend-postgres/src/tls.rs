//! TLS through rustls (ring provider) for `sslmode=require`, `verify-ca` and `verify-full`, and
//! one way to open a connection whatever the mode. The rustls configuration (which certificates
//! are trusted, and how) is built here; `tokio-postgres-rustls` runs it on the connections.

use std::fmt;
use std::sync::Arc;

use futures::stream::BoxStream;
use futures::StreamExt;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use tg_backend_api::{Error, Result};
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::config::SslMode;

/// How the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verify {
    /// Encrypt, accept any certificate (libpq's `sslmode=require` without a root certificate).
    None,
    /// Check the chain against the roots, not the host name (`verify-ca`).
    Chain,
    /// Check the chain and the host name (`verify-full`).
    Full,
}

/// The TLS side of every connection of a backend.
#[derive(Clone)]
pub(crate) enum Tls {
    /// Plain TCP (`sslmode=disable`, `allow`, `prefer`).
    Plain,
    /// rustls.
    Rustls(MakeRustlsConnect),
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Tls::Plain => f.write_str("Plain"),
            Tls::Rustls(_) => f.write_str("Rustls"),
        }
    }
}

/// The messages of a connection (notifications, notices), driving it while polled.
pub(crate) type Messages =
    BoxStream<'static, std::result::Result<AsyncMessage, tokio_postgres::Error>>;

impl Tls {
    /// The TLS side of `sslmode`; `root_cert` is a PEM file of trusted roots (default: the
    /// system's).
    pub(crate) fn for_mode(mode: SslMode, root_cert: Option<&str>) -> Result<Self> {
        let verify = match mode {
            SslMode::Disable | SslMode::Allow | SslMode::Prefer => None,
            SslMode::Require => Some(Verify::None),
            SslMode::VerifyCa => Some(Verify::Chain),
            SslMode::VerifyFull => Some(Verify::Full),
        };
        Self::new(verify, root_cert)
    }

    /// Builds the TLS configuration; `root_cert` is a PEM file of trusted roots.
    fn new(verify: Option<Verify>, root_cert: Option<&str>) -> Result<Self> {
        let Some(verify) = verify else {
            return Ok(Tls::Plain);
        };
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::config(format!("TLS setup: {e}")))?;
        let config = match verify {
            Verify::None => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAny(provider)))
                .with_no_client_auth(),
            Verify::Chain | Verify::Full => {
                let mut roots = RootCertStore::empty();
                match root_cert {
                    Some(path) => {
                        let certs = CertificateDer::pem_file_iter(path).map_err(|e| {
                            Error::config(format!("cannot read sslrootcert {path:?}: {e}"))
                        })?;
                        for cert in certs {
                            let cert = cert.map_err(|e| {
                                Error::config(format!("sslrootcert {path:?} is not PEM: {e}"))
                            })?;
                            roots
                                .add(cert)
                                .map_err(|e| Error::config(format!("sslrootcert {path:?}: {e}")))?;
                        }
                    }
                    None => {
                        for cert in rustls_native_certs::load_native_certs().certs {
                            let _ = roots.add(cert);
                        }
                    }
                }
                if roots.is_empty() {
                    return Err(Error::config(
                        "no trusted root certificates for sslmode=verify-ca/verify-full; \
                         set sslrootcert=/path/to/root.pem",
                    ));
                }
                let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                    .build()
                    .map_err(|e| Error::config(format!("TLS verifier: {e}")))?;
                let verifier: Arc<dyn ServerCertVerifier> = if verify == Verify::Full {
                    inner
                } else {
                    Arc::new(ChainOnly(inner))
                };
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(verifier)
                    .with_no_client_auth()
            }
        };
        Ok(Tls::Rustls(MakeRustlsConnect::new(config)))
    }

    /// Opens a connection; the returned stream must be polled to drive it.
    pub(crate) async fn connect(
        &self,
        pg: &tokio_postgres::Config,
    ) -> std::result::Result<(Client, Messages), tokio_postgres::Error> {
        match self {
            Tls::Plain => {
                let (client, mut conn) = pg.connect(NoTls).await?;
                Ok((
                    client,
                    futures::stream::poll_fn(move |cx| conn.poll_message(cx)).boxed(),
                ))
            }
            Tls::Rustls(make) => {
                let (client, mut conn) = pg.connect(make.clone()).await?;
                Ok((
                    client,
                    futures::stream::poll_fn(move |cx| conn.poll_message(cx)).boxed(),
                ))
            }
        }
    }

    /// Opens a connection driven by a spawned task.
    pub(crate) async fn connect_spawned(
        &self,
        pg: &tokio_postgres::Config,
    ) -> std::result::Result<(Client, tokio::task::JoinHandle<()>), tokio_postgres::Error> {
        let (client, mut messages) = self.connect(pg).await?;
        let task = tokio::spawn(async move { while let Some(Ok(_)) = messages.next().await {} });
        Ok((client, task))
    }
}

/// `sslmode=require`: encryption without authentication of the server (as libpq does without a
/// root certificate). Signatures are still checked, so the handshake itself is sound.
#[derive(Debug)]
struct AcceptAny(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must verify; the host name is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_choose_plain_or_rustls() {
        for mode in [SslMode::Disable, SslMode::Allow, SslMode::Prefer] {
            assert!(
                matches!(Tls::for_mode(mode, None), Ok(Tls::Plain)),
                "{mode:?}"
            );
        }
        assert!(matches!(
            Tls::for_mode(SslMode::Require, None),
            Ok(Tls::Rustls(_))
        ));
    }

    #[test]
    fn an_unreadable_root_certificate_is_named() {
        for mode in [SslMode::VerifyCa, SslMode::VerifyFull] {
            let err = Tls::for_mode(mode, Some("/no/such/root.pem")).unwrap_err();
            assert_eq!(err.kind(), tg_backend_api::ErrorKind::ConfigInvalid);
            assert!(err.to_string().contains("/no/such/root.pem"), "{err}");
        }
    }
}
