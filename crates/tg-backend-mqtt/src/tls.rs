//! TLS for `mqtts://` URLs: rustls with the system's root certificates or a `ca_file`.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::{ClientConfig, RootCertStore};
use tg_backend_api::{Error, Result};

/// The system's PEM bundles (Debian/Ubuntu/Alpine, then Fedora/RHEL).
const SYSTEM_BUNDLES: [&str; 2] = [
    "/etc/ssl/certs/ca-certificates.crt",
    "/etc/pki/tls/certs/ca-bundle.crt",
];

/// The TLS configuration trusting the certificate authorities of `ca_file`, or of the system.
pub(crate) fn tls_config(ca_file: Option<&Path>) -> Result<rumqttc::TlsConfiguration> {
    let (pem, from) = match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| {
                Error::config(format!(
                    "cannot read the TLS CA file {}: {e}",
                    path.display()
                ))
            })?;
            (pem, path.display().to_string())
        }
        None => SYSTEM_BUNDLES
            .iter()
            .find_map(|p| std::fs::read(p).ok().map(|pem| (pem, (*p).to_owned())))
            .ok_or_else(|| {
                Error::config("no system root certificates found for mqtts://; set ca_file")
            })?,
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(Error::config(format!("no usable certificate in {from}")));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::config(format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(rumqttc::TlsConfiguration::Rustls(Arc::new(config)))
}
