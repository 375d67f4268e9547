//! The `server:` and `admin:` sections: listen address, inbound TLS, limits, the admin
//! listener.

use super::Validator;
use crate::config::raw::{RawAdmin, RawAdminAuth, RawLimits, RawServer, RawTls};
use crate::config::{Admin, AdminAuth, DEFAULT_LISTEN, Limits, Server, ServerTls};
use http::HeaderName;

impl Validator<'_> {
    pub(super) fn server(&mut self, raw: &RawServer) -> Server {
        let listen = match &raw.listen {
            Some(text) => self.socket_addr("server.listen", text),
            None => None,
        }
        .unwrap_or_else(|| DEFAULT_LISTEN.parse().expect("valid default"));

        let public_url = raw
            .public_url
            .as_ref()
            .and_then(|text| self.public_url("server.public_url", text));

        let trusted_proxies = self.networks("server.trusted_proxies", raw.trusted_proxies.as_ref());

        let upstream_ca_file = raw
            .upstream_ca_file
            .as_ref()
            .and_then(|text| self.existing_file("server.upstream_ca_file", text));

        let api_key_header = match &raw.api_key_header {
            Some(text) => self.api_key_header("server.api_key_header", text),
            None => None,
        }
        .unwrap_or(HeaderName::from_static("x-api-key"));

        let allow_underscore_headers = raw.allow_underscore_headers.unwrap_or(false);

        let workers = raw
            .workers
            .and_then(|n| self.count("server.workers", n, 1, 1024));

        let tls = raw.tls.as_ref().and_then(|tls| self.tls(tls));

        let default_limits = RawLimits::default();
        let limits = self.limits(raw.limits.as_ref().unwrap_or(&default_limits));

        Server {
            listen,
            public_url,
            trusted_proxies,
            upstream_ca_file,
            api_key_header,
            allow_underscore_headers,
            workers,
            tls,
            limits,
        }
    }

    pub(super) fn tls(&mut self, raw: &RawTls) -> Option<ServerTls> {
        let cert_file = self.required(
            "server.tls.cert_file",
            raw.cert_file.as_ref(),
            "the PEM certificate chain",
        );
        let key_file = self.required(
            "server.tls.key_file",
            raw.key_file.as_ref(),
            "the PEM private key",
        );
        let cert_file = cert_file.and_then(|t| self.existing_file("server.tls.cert_file", t));
        let key_file = key_file.and_then(|t| self.existing_file("server.tls.key_file", t));
        let client_ca_file = match &raw.client_ca_file {
            Some(text) => Some(self.existing_file("server.tls.client_ca_file", text)?),
            None => None,
        };
        // Their content is read by the preflight (`crate::preflight`).
        Some(ServerTls {
            cert_file: cert_file?,
            key_file: key_file?,
            client_ca_file,
        })
    }

    pub(super) fn limits(&mut self, raw: &RawLimits) -> Limits {
        let default = Limits::default();
        Limits {
            max_header_bytes: raw
                .max_header_bytes
                .and_then(|n| self.count("server.limits.max_header_bytes", n, 8192, 1024 * 1024))
                .unwrap_or(default.max_header_bytes),
            max_body_bytes: match raw.max_body_bytes {
                Some(0) => {
                    self.problem("server.limits.max_body_bytes", "must be at least 1");
                    default.max_body_bytes
                }
                Some(n) => n,
                None => default.max_body_bytes,
            },
            header_read_timeout: self.duration_or(
                "server.limits.header_read_timeout",
                raw.header_read_timeout.as_ref(),
                default.header_read_timeout,
            ),
            body_idle_timeout: self.duration_or(
                "server.limits.body_idle_timeout",
                raw.body_idle_timeout.as_ref(),
                default.body_idle_timeout,
            ),
            idle_timeout: self.duration_or(
                "server.limits.idle_timeout",
                raw.idle_timeout.as_ref(),
                default.idle_timeout,
            ),
            request_timeout: self.duration_or(
                "server.limits.request_timeout",
                raw.request_timeout.as_ref(),
                default.request_timeout,
            ),
            max_connections: raw
                .max_connections
                .and_then(|n| self.count("server.limits.max_connections", n, 1, 1_000_000))
                .unwrap_or(default.max_connections),
        }
    }

    pub(super) fn admin(&mut self, raw: &RawAdmin, server: &Server) -> Option<Admin> {
        let text = self.required(
            "admin.listen",
            raw.listen.as_ref(),
            "an address such as 127.0.0.1:9090",
        )?;
        let listen = self.socket_addr("admin.listen", text)?;
        // Port 0 (any free port, as in tests) cannot clash.
        if listen == server.listen && listen.port() != 0 {
            self.problem(
                "admin.listen",
                format!(
                    "{listen} is also server.listen; give the admin listener its own port \
                     (e.g. 127.0.0.1:9090)"
                ),
            );
            return None;
        }
        let auth = raw.auth.as_ref().and_then(|auth| self.admin_auth(auth));
        if raw.auth.is_none() && !listen.ip().is_loopback() {
            self.problem(
                "admin.auth",
                format!(
                    "is required when admin.listen ({listen}) is not a loopback address: the \
                     status page shows every route and its errors; add `basic` or `api_key`"
                ),
            );
            return None;
        }
        if raw.auth.is_some() && auth.is_none() {
            return None;
        }
        Some(Admin { listen, auth })
    }

    fn admin_auth(&mut self, raw: &RawAdminAuth) -> Option<AdminAuth> {
        let mut ok = true;
        let basic = raw.basic.as_ref().and_then(|basic| {
            let checked = self.basic("admin.auth", basic);
            ok &= checked.is_some();
            checked.map(|b| (b.username, b.password))
        });
        let api_key = raw.api_key.as_ref().and_then(|text| {
            let digest = self.inbound_secret("admin.auth.api_key", text, true);
            ok &= digest.is_some();
            digest
        });
        if raw.basic.is_none() && raw.api_key.is_none() {
            self.problem("admin.auth", "needs `basic` or `api_key`");
            return None;
        }
        ok.then_some(AdminAuth { basic, api_key })
    }
}
