//! Builds the upstream `rustls::ClientConfig` once: ring provider, webpki roots, plus the PEM
//! roots of `upstream.ca_file`.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::error::StartError;

/// Installs ring as the process-wide rustls provider. Idempotent.
pub fn install_ring_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

pub fn client_config(ca_file: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, StartError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = ca_file {
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
            .map_err(|e| StartError::Tls(format!("upstream.ca_file `{}`: {e}", path.display())))?
            .collect::<Result<_, _>>()
            .map_err(|e| StartError::Tls(format!("upstream.ca_file `{}`: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(StartError::Tls(format!(
                "upstream.ca_file `{}` holds no PEM certificate",
                path.display()
            )));
        }
        for c in certs {
            roots.add(c).map_err(|e| {
                StartError::Tls(format!("upstream.ca_file `{}`: {e}", path.display()))
            })?;
        }
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| StartError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}
