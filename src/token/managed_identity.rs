//! `managed_identity`: tokens from the Azure platform's local token service
//! (Microsoft Learn: "Use managed identities on a VM to acquire an access token" for IMDS,
//! App Service "Managed identities", REST protocol).
//!
//! - App Service, Functions, Container Apps: `GET {IDENTITY_ENDPOINT}?api-version=2019-08-01
//!   &resource=…` with `X-IDENTITY-HEADER: {IDENTITY_HEADER}`; selectors `client_id`,
//!   `principal_id` (the object id), `mi_res_id`.
//! - VM / VMSS: the instance metadata service, `GET http://169.254.169.254/metadata/identity/
//!   oauth2/token?api-version=2018-02-01&resource=…` with `Metadata: true`; selectors
//!   `client_id`, `object_id`, `msi_res_id`. 404, 410, 429 and 5xx are retried on IMDS's
//!   documented schedule (about 0/2/6/14/30 s).
//!
//! `resource` is the route's scope without `/.default`. Answers carry their numbers as
//! strings (`"expires_on":"1586984735"`), which [`super::response`] accepts. The requests go
//! through [`TokenHttp`]: no HTTP proxy (IMDS refuses proxied calls), no `X-Forwarded-For`
//! (IMDS drops requests carrying it), no redirects. This is the only place the proxy talks to
//! 169.254.169.254; configured upstreams and token URLs on link-local hosts stay refused.

use std::time::Duration;

use http::StatusCode;

use super::{IssuedToken, TokenError, TokenFuture, TokenHttp, TokenSource};
use crate::config::{IdentitySelector, ManagedIdentity, ManagedIdentityEndpoint};

/// The instance metadata service's token endpoint.
pub(crate) const IMDS_TOKEN_URL: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
const IMDS_API_VERSION: &str = "2018-02-01";
const APP_SERVICE_API_VERSION: &str = "2019-08-01";
/// Waits before the 2nd…5th attempt: IMDS's suggested schedule (0/2/6/14/30 s).
pub(crate) const IMDS_RETRY_DELAYS: [Duration; 4] = [
    Duration::from_secs(2),
    Duration::from_secs(4),
    Duration::from_secs(8),
    Duration::from_secs(16),
];
/// Longest wait honoured from a `Retry-After` on IMDS.
const MAX_IMDS_WAIT: Duration = Duration::from_secs(60);

/// Where the IMDS requests go and how they are retried. Tests point it at a loopback fake.
#[derive(Debug, Clone)]
pub(crate) struct Imds {
    pub(crate) url: reqwest::Url,
    pub(crate) retry_delays: Vec<Duration>,
}

impl Default for Imds {
    fn default() -> Self {
        Self {
            url: reqwest::Url::parse(IMDS_TOKEN_URL).expect("constant URL"),
            retry_delays: IMDS_RETRY_DELAYS.to_vec(),
        }
    }
}

#[derive(Debug)]
enum Target {
    AppService {
        url: reqwest::Url,
        header: http::HeaderValue,
    },
    Imds(Imds),
}

#[derive(Debug)]
pub(crate) struct ManagedIdentitySource {
    credential: String,
    target: Target,
    selector: Option<IdentitySelector>,
    http: Result<TokenHttp, TokenError>,
}

impl ManagedIdentitySource {
    pub(crate) fn new(
        credential: &str,
        settings: &ManagedIdentity,
        http: Result<TokenHttp, TokenError>,
        imds: Imds,
    ) -> Result<Self, TokenError> {
        let config_error = |what: &str| TokenError::config(credential, what);
        let target = match &settings.endpoint {
            ManagedIdentityEndpoint::Imds => Target::Imds(imds),
            ManagedIdentityEndpoint::AppService { url, header } => {
                let url = reqwest::Url::parse(&url.to_string())
                    .map_err(|_| config_error("IDENTITY_ENDPOINT is not a valid URL"))?;
                let mut header = http::HeaderValue::from_str(header.expose())
                    .map_err(|_| config_error("IDENTITY_HEADER is not a valid header value"))?;
                header.set_sensitive(true);
                Target::AppService { url, header }
            }
        };
        Ok(Self {
            credential: credential.to_owned(),
            target,
            selector: settings.selector.clone(),
            http,
        })
    }

    async fn request(&self, scope: Option<&str>) -> Result<IssuedToken, TokenError> {
        let http = self.http.as_ref().map_err(Clone::clone)?;
        let Some(scope) = scope else {
            return Err(TokenError::config(
                &self.credential,
                "a managed identity needs the route's scope",
            ));
        };
        // The v1-style token services take the resource, not the scope (their `resource`
        // parameter).
        let resource = scope.strip_suffix("/.default").unwrap_or(scope);
        match &self.target {
            Target::AppService { url, header } => {
                let url = with_query(
                    url,
                    APP_SERVICE_API_VERSION,
                    resource,
                    self.selector("principal_id", "mi_res_id"),
                );
                let request = http
                    .client()
                    .get(url.clone())
                    .header("X-IDENTITY-HEADER", header.clone())
                    .header("Metadata", "true")
                    .header(http::header::ACCEPT, "application/json");
                http.send(request, &url)
                    .await?
                    .into_issued(header.to_str().ok().as_slice())
            }
            Target::Imds(imds) => {
                let url = with_query(
                    &imds.url,
                    IMDS_API_VERSION,
                    resource,
                    self.selector("object_id", "msi_res_id"),
                );
                let mut attempt = 0;
                loop {
                    let request = http
                        .client()
                        .get(url.clone())
                        .header("Metadata", "true")
                        .header(http::header::ACCEPT, "application/json");
                    let response = http.send(request, &url).await?;
                    let retryable = matches!(response.status.as_u16(), 404 | 410 | 429)
                        || response.status.is_server_error();
                    let Some(delay) = imds.retry_delays.get(attempt).filter(|_| retryable) else {
                        return response.into_issued(&[]);
                    };
                    let delay = match response.status {
                        StatusCode::TOO_MANY_REQUESTS => {
                            let hinted = response
                                .into_issued(&[])
                                .err()
                                .and_then(|e| e.retry_after());
                            hinted.map_or(*delay, |h| h.min(MAX_IMDS_WAIT).max(*delay))
                        }
                        _ => *delay,
                    };
                    tracing::debug!(credential = %self.credential, attempt = attempt + 1, wait_ms = delay.as_millis() as u64, "IMDS is not ready; retrying.");
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
            }
        }
    }

    /// The selector as a query pair; the object id and resource id go by `object_name`
    /// and `resource_name`, which differ between the two services.
    fn selector(
        &self,
        object_name: &'static str,
        resource_name: &'static str,
    ) -> Option<(&'static str, &str)> {
        self.selector.as_ref().map(|selector| match selector {
            IdentitySelector::ClientId(id) => ("client_id", id.as_str()),
            IdentitySelector::ObjectId(id) => (object_name, id.as_str()),
            IdentitySelector::ResourceId(id) => (resource_name, id.as_str()),
        })
    }
}

/// `base` with the `api-version`, `resource` and selector query pairs appended.
fn with_query(
    base: &reqwest::Url,
    api_version: &str,
    resource: &str,
    selector: Option<(&str, &str)>,
) -> reqwest::Url {
    let mut url = base.clone();
    {
        let mut query = url.query_pairs_mut();
        query.append_pair("api-version", api_version);
        query.append_pair("resource", resource);
        if let Some((name, value)) = selector {
            query.append_pair(name, value);
        }
    }
    url
}

impl TokenSource for ManagedIdentitySource {
    fn fetch<'a>(&'a self, scope: Option<&'a str>) -> TokenFuture<'a> {
        Box::pin(self.request(scope))
    }
}

#[cfg(test)]
mod tests;
