//! One entry of `routes:`: prefix (unique), upstream, credential and client references,
//! per-route overrides, `retry_on_429` and `upstream_rate_limit`.

use super::{Names, Validator};
use crate::config::raw::{RawRetryOn429, RawRoute, RawUpstream};
use crate::config::{
    Credential, DEFAULT_MAX_QUEUE, DEFAULT_QUEUE_TIMEOUT, Preset, RetryOn429, Route, Server,
};

impl Validator<'_> {
    pub(super) fn route(
        &mut self,
        index: usize,
        raw: &RawRoute,
        prefix: Option<String>,
        server: &Server,
        names: &Names<'_>,
        credentials: &[Credential],
    ) -> Option<Route> {
        let at = format!("routes[{index}]");
        let path = |field: &str| format!("{at}.{field}");
        let allow_plain_http = raw.allow_plain_http.unwrap_or(false);

        let upstream = match &raw.upstream {
            None => {
                self.problem(
                    &path("upstream"),
                    "is required: the base URL requests are forwarded to",
                );
                None
            }
            Some(upstream) => self.upstream(&path("upstream"), upstream, allow_plain_http),
        };

        let credential = self
            .required(
                &path("credential"),
                raw.credential.as_ref(),
                "the name of an entry under `credentials:`",
            )
            .and_then(|text| self.string(&path("credential"), text))
            .and_then(|name| {
                if names.credentials.contains(&name.as_str()) {
                    Some(name)
                } else {
                    let message = format!(
                        "unknown credential `{name}`; {}",
                        defined("credentials", &names.credentials)
                    );
                    self.problem(&path("credential"), message);
                    None
                }
            });

        let clients = self.route_clients(&path("clients"), raw.clients.as_ref(), names);

        let scope = match &raw.scope {
            Some(text) => self.non_empty(&path("scope"), text).map(Some),
            // Entra takes `<resource>/.default`; a generic server gets no scope unless set.
            None => match (&credential, &upstream) {
                (Some(name), Some(upstream)) => {
                    let entra = credentials
                        .iter()
                        .find(|c| c.name == *name)
                        .is_none_or(|c| c.kind.is_entra());
                    Some(entra.then(|| format!("https://{}/.default", upstream.host)))
                }
                _ => None,
            },
        };

        let preset = match &raw.upstream {
            Some(RawUpstream::BusinessCentral(_)) => Some(Preset::BusinessCentral),
            Some(RawUpstream::Dataverse(_)) => Some(Preset::Dataverse),
            Some(RawUpstream::FinanceOperations(_)) => Some(Preset::FinanceOperations),
            Some(RawUpstream::Url(_)) | None => None,
        };
        let defaults = preset.map(Preset::defaults);

        let timeout = match &raw.timeout {
            Some(text) => self.duration(&path("timeout"), text),
            None => Some(
                defaults
                    .and_then(|d| d.timeout)
                    .unwrap_or(server.limits.request_timeout),
            ),
        };

        let max_concurrent = match raw.max_concurrent {
            Some(n) => self.count(&path("max_concurrent"), n, 1, 100_000),
            None => defaults.and_then(|d| d.max_concurrent),
        };
        let upstream_rate_limit = raw
            .upstream_rate_limit
            .as_ref()
            .and_then(|text| self.rate_limit(&path("upstream_rate_limit"), text));
        // Callers wait in the route's queue for a concurrency slot or for the upstream
        // rate, so the queue's bounds apply with either.
        let queued = max_concurrent.is_some() || upstream_rate_limit.is_some();
        let max_queue = match raw.max_queue {
            Some(n) => self.count(&path("max_queue"), n, 0, 1_000_000),
            None => queued.then(|| {
                defaults
                    .and_then(|d| d.max_queue)
                    .unwrap_or(DEFAULT_MAX_QUEUE)
            }),
        };
        let queue_timeout = match &raw.queue_timeout {
            Some(text) => self.duration(&path("queue_timeout"), text),
            None => queued.then_some(DEFAULT_QUEUE_TIMEOUT),
        };
        if raw.max_concurrent.is_none()
            && raw.upstream_rate_limit.is_none()
            && defaults.is_none_or(|d| d.max_concurrent.is_none())
        {
            for (field, set) in [
                ("max_queue", raw.max_queue.is_some()),
                ("queue_timeout", raw.queue_timeout.is_some()),
            ] {
                if set {
                    self.problem(
                        &path(field),
                        format!(
                            "applies only with {at}.max_concurrent or {at}.upstream_rate_limit; \
                             set one of them or remove {at}.{field}"
                        ),
                    );
                }
            }
        }
        let retry_on_429 = match &raw.retry_on_429 {
            Some(retry) => self.retry_on_429(&path("retry_on_429"), retry),
            None => defaults.and_then(|d| d.retry_on_429),
        };

        let strip_request_headers = self.strip_request_headers(
            &path("strip_request_headers"),
            raw.strip_request_headers.as_ref(),
        );

        let doctor_path = match &raw.doctor_path {
            None => Some(None),
            Some(text) => self.string(&path("doctor_path"), text).and_then(|p| {
                let relative = p.trim_start_matches('/').to_owned();
                if relative.contains("..") || relative.contains("://") {
                    self.problem(
                        &path("doctor_path"),
                        "must be a path relative to the upstream URL, such as api/v2.0/companies",
                    );
                    None
                } else {
                    Some(Some(relative))
                }
            }),
        };

        Some(Route {
            prefix: prefix?,
            upstream: upstream?,
            credential: credential?,
            scope: scope?,
            clients: clients?,
            timeout: timeout?,
            rewrite_links: raw
                .rewrite_links
                .unwrap_or(defaults.is_some_and(|d| d.rewrite_links)),
            max_concurrent,
            max_queue,
            queue_timeout,
            retry_on_429,
            upstream_rate_limit,
            allow_plain_http,
            strip_request_headers,
            doctor_path: doctor_path?,
            preset,
        })
    }

    pub(super) fn route_clients(
        &mut self,
        path: &str,
        raw: Option<&Vec<String>>,
        names: &Names<'_>,
    ) -> Option<Vec<String>> {
        let raw = raw.map_or(&[][..], |c| &c[..]);
        if raw.is_empty() {
            self.problem(
                path,
                "a route needs at least one client; list the names under `clients:` that may \
                 call it",
            );
            return None;
        }
        let mut clients = Some(Vec::with_capacity(raw.len()));
        for (i, text) in raw.iter().enumerate() {
            let path = format!("{path}[{i}]");
            let Some(name) = self.string(&path, text) else {
                clients = None;
                continue;
            };
            if !names.clients.contains(&name.as_str()) {
                let message = format!(
                    "unknown client `{name}`; {}",
                    defined("clients", &names.clients)
                );
                self.problem(&path, message);
                clients = None;
            } else if let Some(list) = &mut clients
                && !list.contains(&name)
            {
                list.push(name);
            }
        }
        clients
    }

    pub(super) fn retry_on_429(&mut self, at: &str, raw: &RawRetryOn429) -> Option<RetryOn429> {
        let attempts_path = format!("{at}.attempts");
        let attempts = match raw.attempts {
            None => {
                self.problem(
                    &attempts_path,
                    "is required: how many times to retry, e.g. 3",
                );
                None
            }
            Some(0) => {
                self.problem(
                    &attempts_path,
                    "must be at least 1; remove retry_on_429 to never retry",
                );
                None
            }
            Some(n) => match u32::try_from(n) {
                Ok(n) => Some(n),
                Err(_) => {
                    self.problem(&attempts_path, "is too large");
                    None
                }
            },
        };
        let wait_path = format!("{at}.max_wait");
        let max_wait = self
            .required(
                &wait_path,
                raw.max_wait.as_ref(),
                "the longest Retry-After to honour, e.g. 30s",
            )
            .and_then(|text| self.duration(&wait_path, text));
        Some(RetryOn429 {
            attempts: attempts?,
            max_wait: max_wait?,
        })
    }

    /// A route's prefix, checked on its own and against the routes before it (whether
    /// those are otherwise valid or not).
    pub(super) fn unique_prefix(
        &mut self,
        index: usize,
        raw: &RawRoute,
        seen: &mut Vec<String>,
    ) -> Option<String> {
        let path = format!("routes[{index}].prefix");
        let prefix = self
            .required(&path, raw.prefix.as_ref(), "a path such as /bc/")
            .and_then(|text| self.prefix(&path, text))?;
        // `seen` holds every earlier route's prefix or an empty placeholder, by index.
        // Requests are routed with ASCII case ignored (docs/request-handling.md), so
        // prefixes that differ only in case would claim the same requests.
        let first = seen
            .iter()
            .position(|p| !p.is_empty() && p.eq_ignore_ascii_case(&prefix));
        seen.resize(index, String::new());
        seen.push(prefix.clone());
        if let Some(first) = first {
            let message = if seen[first] == prefix {
                format!(
                    "`{prefix}` is also the prefix of routes[{first}]; each prefix must be unique"
                )
            } else {
                format!(
                    "`{prefix}` differs from routes[{first}].prefix `{}` only in case; paths \
                     are matched without regard to case, so both would claim the same \
                     requests: make them differ in more than case",
                    seen[first]
                )
            };
            self.problem(&path, message);
            return None;
        }
        Some(prefix)
    }
}

pub(super) fn defined(what: &str, names: &[&str]) -> String {
    if names.is_empty() {
        format!("no {what} are defined under `{what}:`")
    } else {
        let list: Vec<String> = names.iter().map(|n| format!("`{n}`")).collect();
        format!("defined {what}: {}", list.join(", "))
    }
}
