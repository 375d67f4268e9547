//! The `s2s-proxy dev` demo: a local token issuer, a sample upstream and the proxy in
//! front of them, all in one process on loopback.
//!
//! [`issuer`] mimics the Microsoft Entra ID v2 token endpoint for the client-credentials
//! grant and issues real ES256 JWTs; [`upstream`] mimics Business Central's API v2.0 and
//! accepts only requests whose bearer token verifies against the issuer's key. The proxy is
//! configured from built-in YAML ([`DevServices::config_source`]) and started through the
//! library's public API, exactly as `s2s-proxy run` does. Everything here is demo and test
//! scaffolding: nothing in the request path depends on it.

mod issuer;
mod upstream;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::graceful::GracefulShutdown;
use ring::rand::{SecureRandom, SystemRandom};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Config, ConfigError, Source};
use crate::secret::Secret;
use crate::{Proxy, StartError};

use issuer::Issuer;
use upstream::SampleUpstream;

/// The demo's tenant: a fixed, obviously fake GUID.
pub const DEV_TENANT: &str = "dec0de00-0000-4000-a000-00000000d3b0";
/// The demo's application (client) id at the issuer.
pub const DEV_CLIENT_ID: &str = "dec0de00-0000-4000-a000-0000000c11e7";
/// Business Central environment name in the upstream's paths.
pub const DEV_ENVIRONMENT: &str = "Production";
/// Basic-auth user and password of the `demo` client.
pub const DEV_USERNAME: &str = "demo";
pub const DEV_PASSWORD: &str = "demo-password";
/// API key of the `scanner` client.
pub const DEV_API_KEY: &str = "demo-key";
/// The proxy route that leads to the sample upstream.
pub const DEV_ROUTE: &str = "/bc/";
/// Application permission carried in every issued token.
pub const DEV_ROLE: &str = "API.ReadWrite.All";
/// `expires_in` of issued tokens (Entra's usual app-only value; never assume 3600).
pub const DEV_TOKEN_LIFETIME_SECS: u64 = 3599;

#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("cannot start the demo servers")]
    Io(#[from] std::io::Error),
    #[error("the built-in demo configuration was rejected")]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("the dev demo listens on loopback only; {0} is not a loopback address")]
    NotLoopback(SocketAddr),
    #[error("cannot generate the demo's key material")]
    Crypto,
}

/// The built-in proxy configuration: YAML text plus the variables its `${…}` refer to.
#[derive(Clone)]
pub struct DevConfig {
    pub yaml: String,
    pub variables: HashMap<String, String>,
}

impl std::fmt::Debug for DevConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The variables hold the demo's client secret.
        f.debug_struct("DevConfig")
            .field("yaml", &self.yaml)
            .finish_non_exhaustive()
    }
}

impl DevConfig {
    /// Name of the configuration in error messages.
    pub const SOURCE_NAME: &'static str = "dev (built-in)";

    pub fn source(&self) -> Source {
        Source::inline(Self::SOURCE_NAME, self.variables.clone())
    }

    pub fn load(&self) -> Result<Config, ConfigError> {
        Config::from_yaml_str(&self.yaml, &self.source())
    }
}

/// The running issuer and sample upstream. Dropping it (or [`DevServices::shutdown`])
/// stops both servers.
#[derive(Debug)]
pub struct DevServices {
    pub issuer_addr: SocketAddr,
    pub upstream_addr: SocketAddr,
    pub tenant: String,
    pub client_id: String,
    client_secret: Secret,
    tokens_issued: Arc<AtomicU64>,
    /// Tests mint expired and foreign-audience tokens with it.
    #[cfg(test)]
    issuer: Arc<Issuer>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// Starts the token issuer and the sample upstream on `127.0.0.1:0`.
pub async fn start_services() -> Result<DevServices, DevError> {
    DevServices::start().await
}

impl DevServices {
    /// Starts the token issuer and the sample upstream on `127.0.0.1:0`, with a fresh
    /// signing key and a fresh random client secret.
    pub async fn start() -> Result<DevServices, DevError> {
        let rng = SystemRandom::new();
        let client_secret = Secret::new(random_client_secret(&rng)?);
        let issuer_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let upstream_listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let issuer_addr = issuer_listener.local_addr()?;
        let upstream_addr = upstream_listener.local_addr()?;
        let tokens_issued = Arc::new(AtomicU64::new(0));

        let issuer = Arc::new(Issuer::new(issuer::Settings {
            origin: origin(issuer_addr),
            tenant: DEV_TENANT.to_owned(),
            client_id: DEV_CLIENT_ID.to_owned(),
            client_secret: client_secret.clone(),
            resource: origin(upstream_addr),
            issued: Arc::clone(&tokens_issued),
        })?);
        let upstream = Arc::new(SampleUpstream::new(upstream::Settings {
            origin: origin(upstream_addr),
            tenant: DEV_TENANT.to_owned(),
            environment: DEV_ENVIRONMENT.to_owned(),
            issuer: issuer.issuer_claim(),
            public_key: issuer.public_key(),
        }));

        let (stop, stopped) = watch::channel(false);
        let serving_issuer = Arc::clone(&issuer);
        let tasks = vec![
            tokio::spawn(serve(
                issuer_listener,
                move |req, _peer| {
                    let issuer = Arc::clone(&serving_issuer);
                    async move { issuer.handle(req).await }
                },
                stopped.clone(),
            )),
            tokio::spawn(serve(
                upstream_listener,
                move |req, peer| {
                    let upstream = Arc::clone(&upstream);
                    async move { upstream.handle(req, peer).await }
                },
                stopped,
            )),
        ];
        Ok(DevServices {
            issuer_addr,
            upstream_addr,
            tenant: DEV_TENANT.to_owned(),
            client_id: DEV_CLIENT_ID.to_owned(),
            client_secret,
            tokens_issued,
            #[cfg(test)]
            issuer,
            stop,
            tasks,
        })
    }

    /// `http://127.0.0.1:<issuer port>`: the credential's `authority`.
    pub fn authority(&self) -> String {
        origin(self.issuer_addr)
    }

    /// The Entra-style token endpoint.
    pub fn token_url(&self) -> String {
        format!("{}/{}/oauth2/v2.0/token", self.authority(), self.tenant)
    }

    /// `http://127.0.0.1:<upstream port>`: the tokens' `aud`, the resource of the scope.
    pub fn upstream_origin(&self) -> String {
        origin(self.upstream_addr)
    }

    /// `http://127.0.0.1:<upstream port>/.default`.
    pub fn scope(&self) -> String {
        format!("{}/.default", self.upstream_origin())
    }

    /// `http://127.0.0.1:<upstream port>/v2.0/<tenant>/Production/`: the route's upstream.
    pub fn upstream_base_url(&self) -> String {
        format!(
            "{}/v2.0/{}/{DEV_ENVIRONMENT}/",
            self.upstream_origin(),
            self.tenant
        )
    }

    /// The random client secret the issuer accepts for [`DevServices::client_id`].
    pub fn client_secret(&self) -> &Secret {
        &self.client_secret
    }

    /// How many access tokens the issuer has handed out so far.
    pub fn tokens_issued(&self) -> u64 {
        self.tokens_issued.load(Ordering::Relaxed)
    }

    /// The built-in proxy configuration, listening on `listen`.
    pub fn config_source(&self, listen: SocketAddr) -> DevConfig {
        let password = Secret::new(DEV_PASSWORD).digest().to_config_form();
        let yaml = format!(
            r#"# Built-in configuration of `s2s-proxy dev`.
server:
  listen: "{listen}"
admin:
  listen: "{admin}"
credentials:
  demo:
    type: client_secret
    tenant_id: "{tenant}"
    client_id: "{client_id}"
    client_secret: "${{DEV_CLIENT_SECRET}}"
    authority: "{authority}"
clients:
  demo:
    basic: {{ username: "{DEV_USERNAME}", password: "{password}" }}
  scanner:
    api_key: "${{DEV_API_KEY}}"
routes:
  - prefix: "{DEV_ROUTE}"
    upstream: "{upstream}"
    credential: demo
    scope: "{scope}"
    clients: [demo, scanner]
    rewrite_links: true
"#,
            // The status page and probes on a free port of the same loopback address.
            admin = SocketAddr::new(listen.ip(), 0),
            tenant = self.tenant,
            client_id = self.client_id,
            authority = self.authority(),
            upstream = self.upstream_base_url(),
            scope = self.scope(),
        );
        let variables = HashMap::from([
            (
                "DEV_CLIENT_SECRET".to_owned(),
                self.client_secret.expose().to_owned(),
            ),
            ("DEV_API_KEY".to_owned(), DEV_API_KEY.to_owned()),
        ]);
        DevConfig { yaml, variables }
    }

    /// The built-in proxy configuration, parsed and validated.
    pub fn config(&self, listen: SocketAddr) -> Result<Config, DevError> {
        Ok(self.config_source(listen).load()?)
    }

    /// Stops both servers, letting in-flight requests finish (up to 5 s).
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        for task in self.tasks.drain(..) {
            let _ = task.await;
        }
    }
}

/// Runs the whole demo until Ctrl-C or SIGTERM. `listen` must be a loopback address; if
/// its port is taken, the proxy falls back to an ephemeral port and says so.
pub async fn run(listen: SocketAddr) -> Result<(), DevError> {
    if !listen.ip().is_loopback() {
        return Err(DevError::NotLoopback(listen));
    }
    let services = DevServices::start().await?;
    let listen = match std::net::TcpListener::bind(listen) {
        // Probe only: released at once so the proxy can bind it.
        Ok(probe) => {
            drop(probe);
            listen
        }
        Err(error) if error.kind() == std::io::ErrorKind::AddrInUse => {
            let fallback = SocketAddr::new(listen.ip(), 0);
            println!("s2s-proxy dev: {listen} is in use; listening on a free port instead.");
            fallback
        }
        Err(error) => return Err(error.into()),
    };
    let proxy = Proxy::bind(services.config(listen)?).await?;
    print!(
        "{}",
        banner(&services, proxy.local_addr(), proxy.admin_addr())
    );
    proxy.run_until(crate::shutdown_signal()).await?;
    let issued = services.tokens_issued();
    services.shutdown().await;
    println!(
        "s2s-proxy dev: stopped. The issuer handed out {issued} token{} (the proxy caches them).",
        if issued == 1 { "" } else { "s" }
    );
    Ok(())
}

fn banner(services: &DevServices, proxy_addr: SocketAddr, admin: Option<SocketAddr>) -> String {
    let proxy = format!("http://{proxy_addr}");
    let route = format!("{proxy}{DEV_ROUTE}");
    let page2 = upstream::second_page_query();
    let user = format!("{DEV_USERNAME}:{DEV_PASSWORD}");
    format!(
        r#"
s2s-proxy dev: demo running on loopback. Ctrl-C stops it.

  token issuer     {token_url}
                   Entra ID v2 look-alike, client {client_id}, ES256-signed tokens
  sample upstream  {upstream}
                   Business Central API v2.0 look-alike; requires a valid bearer token
  proxy            {proxy}
                   route {DEV_ROUTE} -> sample upstream; clients `demo` (Basic) and `scanner` (API key)
  status page      {status}
                   routes, token state and expiry, traffic and recent errors; /metrics beside it

Try:
  curl -u {user} {route}api/v2.0/companies
  curl -u {user} '{route}api/v2.0/companies?{page2}'
      (page 2: the @odata.nextLink of page 1 — links in answers are rewritten to {route})
  curl -H 'X-API-Key: {DEV_API_KEY}' {route}api/v2.0/echo
      (what reached the upstream: headers, and a summary of the injected token)
  curl -i {route}api/v2.0/companies
      (401: no credentials)
  curl -i -u {DEV_USERNAME}:wrong {route}api/v2.0/companies
      (401: wrong password)
  curl -i --path-as-is -u {user} '{route}../admin'
      (400: unsafe path, nothing forwarded)

"#,
        status = admin.map_or_else(|| "-".to_owned(), |admin| format!("http://{admin}/")),
        token_url = services.token_url(),
        client_id = services.client_id,
        upstream = services.upstream_base_url(),
    )
}

/// Serves `handler` on `listener` (HTTP/1.1 and h2c) until `stop` changes or its sender is
/// dropped, then lets open connections finish for up to 5 s.
async fn serve<H, F>(listener: TcpListener, handler: H, mut stop: watch::Receiver<bool>)
where
    H: Fn(hyper::Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        tracing::warn!(error = %error, "Dev server cannot accept a connection.");
                        // Out of file descriptors and the like: do not spin.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let handler = handler.clone();
                let service = hyper::service::service_fn(move |req| {
                    let response = handler(req, peer);
                    async move { Ok::<_, Infallible>(response.await) }
                });
                let connection = builder
                    .serve_connection(TokioIo::new(stream), service)
                    .into_owned();
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    // Clients hanging up mid-request are normal; nothing to report.
                    let _ = connection.await;
                });
            }
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(Duration::from_secs(5), graceful.shutdown()).await;
}

fn origin(addr: SocketAddr) -> String {
    format!("http://{addr}")
}

/// A JSON response with the given status.
fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json; charset=utf-8"),
    );
    response
}

/// Random bytes formatted like a GUID (trace and correlation ids, token ids).
fn uuid_like(rng: &SystemRandom) -> String {
    let mut bytes = [0u8; 16];
    if rng.fill(&mut bytes).is_err() {
        // Only decoration for log correlation; a fixed value is harmless.
        return "00000000-0000-4000-8000-000000000000".to_owned();
    }
    let hex = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// An Entra-shaped secret value: random hex with the `~` that real secrets carry, so the
/// demo exercises form encoding of the secret.
fn random_client_secret(rng: &SystemRandom) -> Result<String, DevError> {
    let mut bytes = [0u8; 20];
    rng.fill(&mut bytes).map_err(|_| DevError::Crypto)?;
    Ok(format!("dev8Q~{}", hex::encode(bytes)))
}

/// Seconds since the Unix epoch (JWT `iat`/`nbf`/`exp` are wall-clock times).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
