//! PEM certificate files: the inbound certificate chain, `client_ca_file` and
//! `upstream_ca_file` are all read the same way, with the same messages.

use std::path::Path;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

/// A certificate file that could not be used; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum CertificateFileError {
    #[error("{path}: cannot read certificates: {message}")]
    Read { path: String, message: String },
    #[error("{path}: contains no PEM certificate")]
    Empty { path: String },
}

/// Every certificate in a PEM file, in file order; none at all is an error.
pub(crate) fn read_certificates(
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, CertificateFileError> {
    let display = path.display().to_string();
    let certificates = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .map_err(|error| CertificateFileError::Read {
            path: display.clone(),
            message: error.to_string(),
        })?;
    if certificates.is_empty() {
        return Err(CertificateFileError::Empty { path: display });
    }
    Ok(certificates)
}
