//! Inbound: who is calling, and may they use this route.
//!
//! A caller is identified by exactly one of, looked at in this order: HTTP Basic
//! credentials, an API key header, a verified TLS client certificate ([`tls`]), or (for
//! clients configured with `networks` and no credential) its source address. The first
//! credential presented decides: one that does not match is a failure, never a fall-back
//! to a later method. So a certificate that chains to `client_ca_file` but matches no
//! client is a 401 unless the request also carries Basic or an API key, which then decide
//! alone. Unknown user and wrong password fail identically, secrets are compared as
//! SHA-256 digests in constant time, and an unknown user still costs one comparison.
//! This module does not see routes beyond the set of client ids a route admits.
//!
//! The caller's address is the TCP peer, or — only when the peer is one of
//! `server.trusted_proxies` — the right-most untrusted address of `X-Forwarded-For`.
//! Abuse limits live in [`throttle`]: failed attempts lock a source address (an IPv6
//! /64) out for a minute, and a client's `rate_limit` caps its requests; their state is
//! the running proxy's ([`Throttles`]), carried across reloads.

pub(crate) mod basic;
mod throttle;
pub(crate) mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use http::{HeaderMap, HeaderName, header};
use ipnet::IpNet;

pub(crate) use self::throttle::Throttles;
use self::throttle::{FailedAuthLimiter, RateLimiter};
use self::tls::PeerCertificate;
use crate::config::{CertificateMatch, Config};
use crate::secret::SecretDigest;

/// Index of an authenticated client in the configuration's client list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ClientId(usize);

/// Why a caller is not authenticated. All but `LockedOut` map to the same 401 response.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum AuthError {
    #[error("no credentials presented and the source address matches no client")]
    Missing,
    #[error("malformed Basic credentials")]
    Malformed,
    #[error("unknown user or wrong password")]
    BadPassword,
    #[error("unknown API key")]
    BadApiKey,
    #[error("the client certificate matches no client")]
    UnknownCertificate,
    #[error("credentials are not accepted from this source address")]
    WrongNetwork,
    /// Too many failed authentications from this source address (429).
    #[error("source address locked out after repeated failed authentications")]
    LockedOut(std::time::Duration),
}

#[derive(Debug)]
struct ClientEntry {
    /// Shared with every access-log line of this client.
    name: Arc<str>,
    networks: Vec<IpNet>,
}

/// Authenticates callers against `clients:`.
#[derive(Debug)]
pub(crate) struct Authenticator {
    clients: Vec<ClientEntry>,
    basic: HashMap<String, (SecretDigest, ClientId)>,
    api_keys: Vec<(SecretDigest, ClientId)>,
    /// In file order: the first match wins (validation keeps them distinct).
    certificates: Vec<(CertificateMatch, ClientId)>,
    /// Clients with networks and no credential, in file order.
    network_only: Vec<ClientId>,
    api_key_header: HeaderName,
    trusted_proxies: Vec<IpNet>,
    /// Compared against when the user is unknown, so both paths cost the same.
    dummy: SecretDigest,
    /// The running proxy's, shared with every configuration.
    failures: Arc<FailedAuthLimiter>,
    /// `clients.<name>.rate_limit`, by client index (the running buckets, by name).
    rate_limits: Vec<Option<Arc<RateLimiter>>>,
}

impl Authenticator {
    /// An authenticator with limiter state of its own.
    pub(crate) fn new(config: &Config) -> Self {
        Self::with_throttles(config, &Throttles::default())
    }

    /// An authenticator that keeps the lockouts and rate-limit buckets in `throttles`.
    pub(crate) fn with_throttles(config: &Config, throttles: &Throttles) -> Self {
        let mut basic = HashMap::new();
        let mut api_keys = Vec::new();
        let mut certificates = Vec::new();
        let mut network_only = Vec::new();
        let clients = config
            .clients
            .iter()
            .enumerate()
            .map(|(index, client)| {
                let id = ClientId(index);
                if let Some(credential) = &client.basic {
                    basic.insert(credential.username.clone(), (credential.password, id));
                }
                if let Some(key) = client.api_key {
                    api_keys.push((key, id));
                }
                if let Some(certificate) = &client.certificate {
                    certificates.push((certificate.clone(), id));
                }
                let has_credential = client.basic.is_some()
                    || client.api_key.is_some()
                    || client.certificate.is_some();
                if !has_credential && !client.networks.is_empty() {
                    network_only.push(id);
                }
                ClientEntry {
                    name: Arc::from(client.name.as_str()),
                    networks: client.networks.clone(),
                }
            })
            .collect();
        Self {
            clients,
            basic,
            api_keys,
            certificates,
            network_only,
            api_key_header: config.server.api_key_header.clone(),
            trusted_proxies: config.server.trusted_proxies.clone(),
            dummy: SecretDigest::of(&fastrand::u64(..).to_le_bytes()),
            failures: throttles.failures(),
            rate_limits: throttles.rate_limiters(&config.clients),
        }
    }

    pub(crate) fn api_key_header(&self) -> &HeaderName {
        &self.api_key_header
    }

    /// The id of the named client, for building route allow-lists.
    pub(crate) fn client_id(&self, name: &str) -> Option<ClientId> {
        self.clients
            .iter()
            .position(|c| &*c.name == name)
            .map(ClientId)
    }

    #[cfg(test)]
    pub(crate) fn client_name(&self, id: ClientId) -> &str {
        &self.clients[id.0].name
    }

    /// The client's name for its access-log lines (shared, not copied per request).
    pub(crate) fn log_name(&self, id: ClientId) -> Arc<str> {
        Arc::clone(&self.clients[id.0].name)
    }

    pub(crate) fn is_trusted_proxy(&self, peer: IpAddr) -> bool {
        contains(&self.trusted_proxies, peer)
    }

    /// The caller's address: the peer, or the right-most untrusted hop of
    /// `X-Forwarded-For` when the peer is a trusted proxy.
    pub(crate) fn client_ip(&self, headers: &HeaderMap, peer: IpAddr) -> IpAddr {
        if !self.is_trusted_proxy(peer) {
            return peer;
        }
        let mut client = peer;
        let hops = headers
            .get_all(HeaderName::from_static("x-forwarded-for"))
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(','));
        for hop in hops.rev() {
            match parse_hop(hop) {
                Some(ip) => {
                    client = ip;
                    if !self.is_trusted_proxy(ip) {
                        break;
                    }
                }
                // A hop we cannot read breaks the chain: the caller is unknown, not the
                // trusted proxy that forwarded it.
                None => return IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            }
        }
        client
    }

    /// Identifies the caller of a request from `client_ip`; `peer_certificate` is the
    /// verified client certificate of its TLS connection, if any. Presented credentials
    /// that do not match count against the source address; too many lock it out for a
    /// while.
    pub(crate) fn authenticate(
        &self,
        headers: &HeaderMap,
        client_ip: IpAddr,
        peer_certificate: Option<&PeerCertificate>,
    ) -> Result<ClientId, AuthError> {
        self.failures
            .check(client_ip)
            .map_err(AuthError::LockedOut)?;
        let result = self.identify(headers, client_ip, peer_certificate);
        if let Err(error) = result
            && error != AuthError::Missing
        {
            self.failures.failed(client_ip);
        }
        result
    }

    /// Takes one request from the client's `rate_limit` (the fleet's, with `cluster`),
    /// or `Err(retry_after)`.
    pub(crate) async fn admit(&self, id: ClientId) -> Result<(), std::time::Duration> {
        match &self.rate_limits[id.0] {
            Some(limiter) => limiter.admit().await,
            None => Ok(()),
        }
    }

    fn identify(
        &self,
        headers: &HeaderMap,
        client_ip: IpAddr,
        peer_certificate: Option<&PeerCertificate>,
    ) -> Result<ClientId, AuthError> {
        if let Some(value) = headers.get(header::AUTHORIZATION)
            && let Some(credentials) = basic::parse(value.as_bytes())
        {
            let (username, password) = credentials.map_err(|_| AuthError::Malformed)?;
            let presented = SecretDigest::of(password.as_bytes());
            let (stored, id) = match self.basic.get(username.as_str()) {
                Some((stored, id)) => (stored, Some(*id)),
                None => (&self.dummy, None),
            };
            let matches = stored.matches(&presented);
            let id = id.filter(|_| matches).ok_or(AuthError::BadPassword)?;
            return self.check_network(id, client_ip);
        }
        if let Some(value) = headers.get(&self.api_key_header) {
            let presented = SecretDigest::of(value.as_bytes());
            // Compare against every key so timing says nothing about which one is close.
            let mut found = None;
            for (stored, id) in &self.api_keys {
                if stored.matches(&presented) {
                    found = Some(*id);
                }
            }
            let id = found.ok_or(AuthError::BadApiKey)?;
            return self.check_network(id, client_ip);
        }
        if let Some(certificate) = peer_certificate {
            let id = self
                .certificates
                .iter()
                .find(|(expected, _)| certificate_matches(expected, certificate))
                .map(|(_, id)| *id)
                .ok_or(AuthError::UnknownCertificate)?;
            return self.check_network(id, client_ip);
        }
        self.network_only
            .iter()
            .copied()
            .find(|id| contains(&self.clients[id.0].networks, client_ip))
            .ok_or(AuthError::Missing)
    }

    fn check_network(&self, id: ClientId, client_ip: IpAddr) -> Result<ClientId, AuthError> {
        let networks = &self.clients[id.0].networks;
        if networks.is_empty() || contains(networks, client_ip) {
            Ok(id)
        } else {
            Err(AuthError::WrongNetwork)
        }
    }
}

/// Fingerprints are public, so a plain comparison will do; the CN is compared exactly.
fn certificate_matches(expected: &CertificateMatch, presented: &PeerCertificate) -> bool {
    match expected {
        CertificateMatch::SubjectCn(cn) => presented.subject_cn.as_deref() == Some(cn.as_str()),
        CertificateMatch::SanDns(name) => presented.san_dns.iter().any(|san| san == name),
        CertificateMatch::FingerprintSha256(fingerprint) => {
            presented.fingerprint_sha256 == *fingerprint
        }
    }
}

/// One `X-Forwarded-For` entry: an address, optionally with a port (`1.2.3.4:5678`,
/// `[2001:db8::1]:443`, as some load balancers write them).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse() {
        return Some(ip);
    }
    if let Some(rest) = hop.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (ip, port) = hop.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    ip.parse().ok()
}

fn contains(networks: &[IpNet], ip: IpAddr) -> bool {
    let ip = ip.to_canonical();
    networks.iter().any(|net| net.contains(&ip))
}

/// The clients a route admits.
#[derive(Debug, Clone, Default)]
pub(crate) struct ClientSet(Vec<ClientId>);

impl ClientSet {
    pub(crate) fn new(ids: impl IntoIterator<Item = ClientId>) -> Self {
        Self(ids.into_iter().collect())
    }

    pub(crate) fn admits(&self, id: ClientId) -> bool {
        self.0.contains(&id)
    }
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use http::HeaderValue;

    use super::*;
    use crate::config::{BasicCredential, Client, Config, Limits, Server};
    use crate::secret::Secret;

    fn client(name: &str) -> Client {
        Client {
            name: name.into(),
            basic: None,
            api_key: None,
            networks: vec![],
            rate_limit: None,
            certificate: None,
        }
    }

    fn config(clients: Vec<Client>, trusted: &[&str]) -> Config {
        Config {
            server: Server {
                listen: "127.0.0.1:0".parse().unwrap(),
                public_url: None,
                trusted_proxies: trusted.iter().map(|n| n.parse().unwrap()).collect(),
                upstream_ca_file: None,
                api_key_header: HeaderName::from_static("x-api-key"),
                allow_underscore_headers: false,
                workers: None,
                tls: None,
                limits: Limits::default(),
            },
            admin: None,
            cluster: None,
            credentials: vec![],
            clients,
            routes: vec![],
            secret_stores: Default::default(),
            prepared: Default::default(),
        }
    }

    fn authenticator() -> Authenticator {
        let mut erp = client("erp");
        erp.basic = Some(BasicCredential {
            username: "erp".into(),
            password: Secret::new("pw:with:colons").digest(),
        });
        let mut scanner = client("scanner");
        scanner.api_key = Some(Secret::new("ak_CANARY").digest());
        scanner.networks = vec!["192.168.10.0/24".parse().unwrap()];
        let mut floor = client("floor");
        floor.networks = vec!["10.20.0.0/16".parse().unwrap()];
        let mut edi = client("edi");
        edi.certificate = Some(CertificateMatch::SubjectCn("edi.contoso.com".into()));
        let mut pinned = client("pinned");
        pinned.certificate = Some(CertificateMatch::FingerprintSha256([7; 32]));
        pinned.networks = vec!["10.20.0.0/16".parse().unwrap()];
        let mut gateway = client("gateway");
        gateway.certificate = Some(CertificateMatch::SanDns("gw.plant.contoso.com".into()));
        Authenticator::new(&config(
            vec![erp, scanner, floor, edi, pinned, gateway],
            &["10.0.0.1/32"],
        ))
    }

    fn peer(cn: Option<&str>, fingerprint: [u8; 32]) -> PeerCertificate {
        PeerCertificate {
            fingerprint_sha256: fingerprint,
            subject_cn: cn.map(str::to_owned),
            san_dns: Vec::new(),
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn basic(user_pass: &str) -> String {
        format!("Basic {}", STANDARD.encode(user_pass))
    }

    const OUTSIDE: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2));

    #[test]
    fn basic_credentials() {
        let auth = authenticator();
        let ok = auth.authenticate(
            &headers(&[("authorization", &basic("erp:pw:with:colons"))]),
            OUTSIDE,
            None,
        );
        assert_eq!(
            ok.map(|id| auth.client_name(id).to_owned()),
            Ok("erp".into())
        );
        let lower = format!("basic {}", STANDARD.encode("erp:pw:with:colons"));
        assert!(
            auth.authenticate(&headers(&[("authorization", &lower)]), OUTSIDE, None)
                .is_ok()
        );
        for bad in [
            basic("erp:wrong"),
            basic("nobody:pw:with:colons"),
            basic("erp"),
        ] {
            assert!(
                auth.authenticate(&headers(&[("authorization", &bad)]), OUTSIDE, None)
                    .is_err(),
                "{bad}"
            );
        }
        for malformed in ["Basic", "Basic !!!", "Basic Og=="] {
            assert!(
                auth.authenticate(&headers(&[("authorization", malformed)]), OUTSIDE, None)
                    .is_err()
            );
        }
    }

    #[test]
    fn api_key_requires_its_network() {
        let auth = authenticator();
        let key = headers(&[("x-api-key", "ak_CANARY")]);
        assert_eq!(
            auth.authenticate(&key, OUTSIDE, None),
            Err(AuthError::WrongNetwork)
        );
        let inside: IpAddr = "192.168.10.7".parse().unwrap();
        assert!(auth.authenticate(&key, inside, None).is_ok());
        assert_eq!(
            auth.authenticate(&headers(&[("x-api-key", "nope")]), inside, None),
            Err(AuthError::BadApiKey)
        );
    }

    #[test]
    fn network_only_clients_and_no_fallback_for_bad_credentials() {
        let auth = authenticator();
        let floor_ip: IpAddr = "10.20.3.4".parse().unwrap();
        let id = auth
            .authenticate(&HeaderMap::new(), floor_ip, None)
            .unwrap();
        assert_eq!(auth.client_name(id), "floor");
        assert_eq!(
            auth.authenticate(&HeaderMap::new(), OUTSIDE, None),
            Err(AuthError::Missing)
        );
        let wrong = headers(&[("authorization", &basic("erp:wrong"))]);
        assert!(auth.authenticate(&wrong, floor_ip, None).is_err());
        // A scheme the proxy does not use is no credential at all.
        let bearer = headers(&[("authorization", "Bearer abc")]);
        assert!(auth.authenticate(&bearer, floor_ip, None).is_ok());
    }

    #[test]
    fn certificates_by_subject_cn_or_fingerprint() {
        let auth = authenticator();
        let name = |result: Result<ClientId, AuthError>| result.map(|id| auth.client_name(id));
        let none = HeaderMap::new();
        let edi = peer(Some("edi.contoso.com"), [0; 32]);
        assert_eq!(
            name(auth.authenticate(&none, OUTSIDE, Some(&edi))),
            Ok("edi")
        );
        // CN comparison is exact.
        let upper = peer(Some("EDI.contoso.com"), [0; 32]);
        assert_eq!(
            auth.authenticate(&none, OUTSIDE, Some(&upper)),
            Err(AuthError::UnknownCertificate)
        );
        // A fingerprint client keeps its network restriction.
        let pinned = peer(None, [7; 32]);
        let floor_ip: IpAddr = "10.20.3.4".parse().unwrap();
        assert_eq!(
            name(auth.authenticate(&none, floor_ip, Some(&pinned))),
            Ok("pinned")
        );
        assert_eq!(
            auth.authenticate(&none, OUTSIDE, Some(&pinned)),
            Err(AuthError::WrongNetwork)
        );
        // A DNS subject alternative name, whatever the CN.
        let mut gateway = peer(Some("unrelated"), [1; 32]);
        gateway.san_dns = vec!["other.example".into(), "gw.plant.contoso.com".into()];
        assert_eq!(
            name(auth.authenticate(&none, OUTSIDE, Some(&gateway))),
            Ok("gateway")
        );
    }

    #[test]
    fn unmatched_certificate_never_grants_access_but_other_credentials_decide_first() {
        let auth = authenticator();
        let stranger = peer(Some("stranger.example"), [1; 32]);
        let floor_ip: IpAddr = "10.20.3.4".parse().unwrap();
        // No fall-back to the network identity of `floor`.
        assert_eq!(
            auth.authenticate(&HeaderMap::new(), floor_ip, Some(&stranger)),
            Err(AuthError::UnknownCertificate)
        );
        // Basic and API keys come first and decide alone, whatever the certificate.
        let erp = headers(&[("authorization", &basic("erp:pw:with:colons"))]);
        assert_eq!(
            auth.authenticate(&erp, OUTSIDE, Some(&stranger))
                .map(|id| auth.client_name(id)),
            Ok("erp")
        );
        let edi = peer(Some("edi.contoso.com"), [0; 32]);
        let wrong = headers(&[("authorization", &basic("erp:wrong"))]);
        assert_eq!(
            auth.authenticate(&wrong, OUTSIDE, Some(&edi)),
            Err(AuthError::BadPassword)
        );
    }

    #[test]
    fn forwarded_for_only_from_trusted_proxies() {
        let auth = authenticator();
        let spoofed = headers(&[("x-forwarded-for", "10.20.3.4")]);
        assert_eq!(auth.client_ip(&spoofed, OUTSIDE), OUTSIDE);
        let proxy: IpAddr = "10.0.0.1".parse().unwrap();
        let chain = headers(&[("x-forwarded-for", "1.2.3.4, 10.20.3.4, 10.0.0.1")]);
        assert_eq!(
            auth.client_ip(&chain, proxy),
            "10.20.3.4".parse::<IpAddr>().unwrap()
        );
        let with_ports = headers(&[("x-forwarded-for", "10.20.3.4:51234, [::1]:443")]);
        assert_eq!(
            auth.client_ip(&with_ports, proxy),
            "::1".parse::<IpAddr>().unwrap()
        );
        let garbage = headers(&[("x-forwarded-for", "10.20.3.4, unknown")]);
        assert_eq!(
            auth.client_ip(&garbage, proxy),
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        );
    }

    #[test]
    fn client_ids_by_name() {
        let auth = authenticator();
        assert_eq!(
            auth.client_id("floor")
                .map(|id| auth.client_name(id).to_owned()),
            Some("floor".into())
        );
        assert!(auth.client_id("nobody").is_none());
    }
}
