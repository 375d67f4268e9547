//! `workload_identity`: Kubernetes workload identity federation (Azure Workload Identity docs). The
//! client assertion is the projected service-account token in `AZURE_FEDERATED_TOKEN_FILE`
//! (or `token_file`), read again for every token request because the kubelet rotates it.

use std::io::Read;
use std::path::PathBuf;

use super::{IssuedToken, TokenError, TokenFuture, TokenHttp, TokenSource};
use crate::config::WorkloadIdentity;

/// A projected token is about 1 KiB; anything this large is not one.
const MAX_TOKEN_FILE_BYTES: u64 = 64 * 1024;

#[derive(Debug)]
pub(crate) struct WorkloadIdentitySource {
    credential: String,
    url: reqwest::Url,
    client_id: String,
    token_file: PathBuf,
    http: Result<TokenHttp, TokenError>,
}

impl WorkloadIdentitySource {
    pub(crate) fn new(
        credential: &str,
        settings: &WorkloadIdentity,
        http: Result<TokenHttp, TokenError>,
    ) -> Result<Self, TokenError> {
        Ok(Self {
            credential: credential.to_owned(),
            url: super::endpoint_url(credential, settings.endpoint.url())?,
            client_id: settings.client_id.clone(),
            token_file: settings.token_file.clone(),
            http,
        })
    }

    fn read_assertion(&self) -> Result<String, TokenError> {
        let fail = |what: String| {
            TokenError::config(
                &self.credential,
                format!("federated token file {}: {what}", self.token_file.display()),
            )
        };
        let mut text = String::new();
        std::fs::File::open(&self.token_file)
            .and_then(|f| f.take(MAX_TOKEN_FILE_BYTES + 1).read_to_string(&mut text))
            .map_err(|e| fail(format!("cannot read it: {e}")))?;
        if text.len() as u64 > MAX_TOKEN_FILE_BYTES {
            return Err(fail("larger than 64 KiB".to_owned()));
        }
        let token = text.trim();
        if token.is_empty() {
            return Err(fail("is empty".to_owned()));
        }
        Ok(token.to_owned())
    }

    async fn request(&self, scope: Option<&str>) -> Result<IssuedToken, TokenError> {
        let http = self.http.as_ref().map_err(Clone::clone)?;
        let assertion = self.read_assertion()?;
        http.post_assertion(&self.url, &self.client_id, &assertion, scope)
            .await
    }
}

impl TokenSource for WorkloadIdentitySource {
    fn fetch<'a>(&'a self, scope: Option<&'a str>) -> TokenFuture<'a> {
        Box::pin(self.request(scope))
    }
}

#[cfg(test)]
mod tests;
