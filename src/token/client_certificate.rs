//! `client_certificate`: the client-credentials grant authenticated with a signed client
//! assertion (RFC 7523 §2.2; Entra "certificate credentials").
//!
//! Every token request signs a fresh assertion whose `aud` is the very URL posted to. The
//! certificates are loaded once; after `invalid_client` the refused file is loaded again on
//! its next use (a renewed certificate written over the old file needs no restart) and the
//! next configured certificate is tried ([`super::rotation`]). At start-up and reload the
//! certificates come parsed from the configuration loader ([`PreparedCertificates`]), so a
//! load reads each file once.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use super::assertion::SigningCertificate;
use super::rotation::{self, Rotation};
use super::{IssuedToken, TokenError, TokenFuture, TokenHttp, TokenSource};
use crate::config::{AssertionAlg, CertificateFile, ClientCertificate};

/// `client_certificate`: a freshly signed assertion for every token request, trying the
/// configured certificates in turn (rotation).
pub(crate) struct ClientCertificateSource {
    credential: String,
    url: reqwest::Url,
    client_id: String,
    alg: AssertionAlg,
    send_chain: bool,
    /// Each configured file with its loaded form; `None`: load on next use.
    certificates: Vec<(CertificateFile, Mutex<Option<Arc<SigningCertificate>>>)>,
    rotation: Rotation,
    http: Result<TokenHttp, TokenError>,
}

impl std::fmt::Debug for ClientCertificateSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientCertificateSource")
            .field("credential", &self.credential)
            .field("client_id", &self.client_id)
            .field("alg", &self.alg)
            .field("certificates", &self.certificates.len())
            .finish_non_exhaustive()
    }
}

/// The client certificates the configuration loader's second stage parsed (see
/// `src/preflight.rs`), per credential in `certificate_files` order, each with the path and
/// algorithm it was loaded for. Sources and expiry reports take them from here instead of
/// reading the files again. Debug shows no key material.
#[derive(Debug, Default)]
pub struct PreparedCertificates(
    std::collections::HashMap<String, Vec<(std::path::PathBuf, AssertionAlg, Loaded)>>,
);

type Loaded = Result<Arc<SigningCertificate>, String>;

impl PreparedCertificates {
    /// Loads entry `file` of `credential` (the next in order) and keeps the result; the
    /// message says what is wrong with the file and how to fix it.
    pub(crate) fn load(
        &mut self,
        credential: &str,
        file: &CertificateFile,
        alg: AssertionAlg,
    ) -> Result<(), String> {
        let loaded = SigningCertificate::load(file, alg).map(Arc::new);
        let result = loaded.as_ref().map(|_| ()).map_err(Clone::clone);
        self.0
            .entry(credential.to_owned())
            .or_default()
            .push((file.path.clone(), alg, loaded));
        result
    }

    /// What entry `index` of `credential` loaded to, if it was loaded for this very path
    /// and algorithm (a configuration changed after loading falls back to the file).
    pub(crate) fn get(
        &self,
        credential: &str,
        index: usize,
        file: &CertificateFile,
        alg: AssertionAlg,
    ) -> Option<&Loaded> {
        let (path, loaded_alg, loaded) = self.0.get(credential)?.get(index)?;
        (*path == file.path && *loaded_alg == alg).then_some(loaded)
    }
}

/// Entry `index` of `settings`, from `prepared` when it holds it, else read from its file.
pub(crate) fn prepared_or_load(
    prepared: Option<&PreparedCertificates>,
    credential: &str,
    settings: &ClientCertificate,
    index: usize,
) -> Loaded {
    let file = &settings.certificates[index];
    let alg = settings.assertion_alg;
    match prepared.and_then(|p| p.get(credential, index, file, alg)) {
        Some(loaded) => loaded.clone(),
        None => SigningCertificate::load(file, alg).map(Arc::new),
    }
}

impl ClientCertificateSource {
    /// The source for `settings`, taking the certificates from `prepared` (the loader's
    /// second stage) where it holds them.
    pub(crate) fn new(
        credential: &str,
        settings: &ClientCertificate,
        http: Result<TokenHttp, TokenError>,
        prepared: Option<&PreparedCertificates>,
    ) -> Result<Self, TokenError> {
        let url = super::endpoint_url(credential, settings.endpoint.url())?;
        let certificates = settings
            .certificates
            .iter()
            .enumerate()
            .map(|(index, file)| {
                // Loaded now so that a broken file shows at start-up; failures retry later.
                let loaded = prepared_or_load(prepared, credential, settings, index).ok();
                (file.clone(), Mutex::new(loaded))
            })
            .collect();
        Ok(Self {
            credential: credential.to_owned(),
            url,
            client_id: settings.client_id.clone(),
            alg: settings.assertion_alg,
            send_chain: settings.send_certificate_chain,
            certificates,
            rotation: Rotation::new(settings.certificates.len()),
            http,
        })
    }

    fn certificate(&self, index: usize) -> Result<Arc<SigningCertificate>, TokenError> {
        let (file, slot) = &self.certificates[index];
        let mut slot = slot.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(loaded) = &*slot {
            return Ok(Arc::clone(loaded));
        }
        let loaded = SigningCertificate::load(file, self.alg)
            .map(Arc::new)
            .map_err(|e| TokenError::config(&self.credential, e))?;
        *slot = Some(Arc::clone(&loaded));
        Ok(loaded)
    }

    async fn with_certificate(
        &self,
        index: usize,
        scope: Option<&str>,
    ) -> Result<IssuedToken, TokenError> {
        let http = self.http.as_ref().map_err(Clone::clone)?;
        let certificate = self.certificate(index)?;
        let assertion = certificate
            .assertion(
                self.alg,
                &self.client_id,
                self.url.as_str(),
                self.send_chain,
                SystemTime::now(),
            )
            .map_err(|e| TokenError::config(&self.credential, e))?;
        let result = http
            .post_assertion(&self.url, &self.client_id, &assertion, scope)
            .await;
        if let Err(error) = &result
            && rotation::is_invalid_client(error)
        {
            // Load the file again next time: it may have been renewed in place.
            *self.certificates[index]
                .1
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = None;
        }
        result
    }

    async fn request(&self, scope: Option<&str>) -> Result<IssuedToken, TokenError> {
        rotation::try_in_turn(
            &self.rotation,
            &self.credential,
            "certificate_files",
            |index| self.with_certificate(index, scope),
        )
        .await
    }
}

impl TokenSource for ClientCertificateSource {
    fn fetch<'a>(&'a self, scope: Option<&'a str>) -> TokenFuture<'a> {
        Box::pin(self.request(scope))
    }

    fn reread_files(&self) {
        for (_, slot) in &self.certificates {
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
    }

    fn adopt_prepared(&self, prepared: &PreparedCertificates) {
        for (index, (file, slot)) in self.certificates.iter().enumerate() {
            if let Some(Ok(loaded)) = prepared.get(&self.credential, index, file, self.alg) {
                *slot.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(loaded));
            }
        }
    }
}

#[cfg(test)]
mod tests;
