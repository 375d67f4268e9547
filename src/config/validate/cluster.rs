//! The `cluster:` section: the Redis URL (kept as a secret, shown redacted), the key prefix
//! and the per-call budget.

use super::Validator;
use crate::config::raw::RawCluster;
use crate::config::{Cluster, DEFAULT_CLUSTER_TIMEOUT, DEFAULT_KEY_PREFIX, RedisUrl};
use crate::secret::Secret;
use std::time::Duration;

/// Longest `cluster.timeout`: past this a request would wait on Redis longer than on
/// most upstreams.
const MAX_TIMEOUT: Duration = Duration::from_secs(5);

impl Validator<'_> {
    pub(super) fn cluster(&mut self, raw: &RawCluster) -> Option<Cluster> {
        let redis = self
            .required(
                "cluster.redis",
                raw.redis.as_ref(),
                "the Redis URL, redis://host:6379/0 or rediss://…",
            )
            .and_then(|text| self.string("cluster.redis", text))
            .and_then(|url| self.redis_url("cluster.redis", url));
        let key_prefix = match &raw.key_prefix {
            Some(text) => self
                .string("cluster.key_prefix", text)
                .and_then(|prefix| self.key_prefix("cluster.key_prefix", prefix)),
            None => Some(DEFAULT_KEY_PREFIX.to_owned()),
        };
        let timeout = self.duration_or(
            "cluster.timeout",
            raw.timeout.as_ref(),
            DEFAULT_CLUSTER_TIMEOUT,
        );
        if timeout > MAX_TIMEOUT {
            self.problem("cluster.timeout", "must be at most 5s");
        }
        Some(Cluster {
            redis: redis?,
            key_prefix: key_prefix?,
            timeout,
        })
    }

    /// Checks the URL's form without ever repeating it whole: it may hold a password.
    fn redis_url(&mut self, path: &str, url: String) -> Option<RedisUrl> {
        let url = Secret::new(url);
        let Some(redacted) = redact(url.expose()) else {
            self.problem(
                path,
                "is not a Redis URL: write redis://[user:password@]host[:port][/db], or \
                 rediss://… for TLS",
            );
            return None;
        };
        if url.expose().contains('#') {
            // The client reads `#insecure` as "skip certificate verification".
            self.problem(
                path,
                format!("`{redacted}` has a fragment (`#…`); remove it: rediss:// always verifies the certificate"),
            );
            return None;
        }
        if redis::Client::open(url.expose()).is_err() {
            self.problem(
                path,
                format!(
                    "`{redacted}` is not a valid Redis URL: write \
                     redis://[user:password@]host[:port][/db], or rediss://… for TLS"
                ),
            );
            return None;
        }
        Some(RedisUrl::new(url, redacted))
    }

    fn key_prefix(&mut self, path: &str, prefix: String) -> Option<String> {
        let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':');
        if prefix.is_empty() || prefix.len() > 64 || !prefix.chars().all(allowed) {
            self.problem(
                path,
                format!(
                    "`{prefix}` is not a key prefix: use 1 to 64 letters, digits, `-`, `_`, `.` or `:`"
                ),
            );
            return None;
        }
        Some(prefix)
    }
}

/// The URL with its user information replaced by `****` (`user:****@` when a user name is
/// given), or `None` when it is not `redis://` or `rediss://` with a host.
pub(crate) fn redact(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    if scheme != "redis" && scheme != "rediss" {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let (userinfo, host) = match authority.rsplit_once('@') {
        Some((userinfo, host)) => (Some(userinfo), host),
        None => (None, authority),
    };
    if host.is_empty() || host.starts_with(':') {
        return None;
    }
    let user = match userinfo {
        None => String::new(),
        Some(info) => match info.split_once(':') {
            Some((user, _)) if !user.is_empty() => format!("{user}:****@"),
            _ => "****@".to_owned(),
        },
    };
    Some(format!("{scheme}://{user}{host}{tail}"))
}

#[cfg(test)]
mod tests {
    use super::redact;
    use crate::config::{Config, Source};
    use std::collections::HashMap;
    use std::time::Duration;

    const PASSWORD: &str = "redis_CANARY_4b1d";

    fn load(cluster: &str) -> Result<Config, crate::config::ConfigError> {
        let yaml = format!("cluster:\n{cluster}\n");
        let variables = HashMap::from([("REDIS_PASSWORD".to_owned(), PASSWORD.to_owned())]);
        Config::from_yaml_str(&yaml, &Source::inline("proxy.yaml", variables))
    }

    fn problems(cluster: &str) -> Vec<String> {
        let error = load(cluster).expect_err("must be refused");
        let text = error.to_string();
        assert!(!text.contains(PASSWORD), "the password leaked: {text}");
        error
            .problems()
            .iter()
            .map(|p| format!("{}: {}", p.path, p.message))
            .collect()
    }

    #[test]
    fn the_password_comes_from_a_variable_and_never_shows() {
        let config = load("  redis: redis://:${REDIS_PASSWORD}@127.0.0.1:6379/0").unwrap();
        let cluster = config.cluster.as_ref().expect("cluster");
        assert_eq!(
            cluster.redis.expose(),
            format!("redis://:{PASSWORD}@127.0.0.1:6379/0")
        );
        assert_eq!(cluster.redis.redacted(), "redis://****@127.0.0.1:6379/0");
        assert_eq!(cluster.key_prefix, "s2s-proxy");
        assert_eq!(cluster.timeout, Duration::from_millis(5));
        assert!(!cluster.redis.is_tls());
        for shown in [
            format!("{config:?}"),
            format!("{cluster:?}"),
            cluster.redis.to_string(),
        ] {
            assert!(!shown.contains(PASSWORD), "{shown}");
        }
        let tls = load("  redis: rediss://app:${REDIS_PASSWORD}@cache:6380\n  key_prefix: bc-prod\n  timeout: 20ms").unwrap();
        let tls = tls.cluster.unwrap();
        assert!(tls.redis.is_tls());
        assert_eq!(tls.key_prefix, "bc-prod");
        assert_eq!(tls.timeout, Duration::from_millis(20));
    }

    #[test]
    fn wrong_urls_prefixes_and_budgets_are_named_by_path() {
        assert_eq!(
            problems("  key_prefix: x"),
            ["cluster.redis: is required: the Redis URL, redis://host:6379/0 or rediss://…"]
        );
        assert_eq!(
            problems("  redis: https://:${REDIS_PASSWORD}@cache:6380"),
            [
                "cluster.redis: is not a Redis URL: write redis://[user:password@]host[:port][/db], or rediss://… for TLS"
            ]
        );
        assert_eq!(
            problems("  redis: rediss://:${REDIS_PASSWORD}@cache:6380/#insecure"),
            [
                "cluster.redis: `rediss://****@cache:6380/#insecure` has a fragment (`#…`); remove it: rediss:// always verifies the certificate"
            ]
        );
        assert_eq!(
            problems("  redis: redis://cache:notaport"),
            [
                "cluster.redis: `redis://cache:notaport` is not a valid Redis URL: write redis://[user:password@]host[:port][/db], or rediss://… for TLS"
            ]
        );
        assert_eq!(
            problems("  redis: redis://cache\n  key_prefix: 'a b'\n  timeout: 10s"),
            [
                "cluster.key_prefix: `a b` is not a key prefix: use 1 to 64 letters, digits, `-`, `_`, `.` or `:`",
                "cluster.timeout: must be at most 5s",
            ]
        );
    }

    #[test]
    fn redaction_hides_every_password_form() {
        assert_eq!(
            redact("redis://:s3cret@redis:6379/0").as_deref(),
            Some("redis://****@redis:6379/0")
        );
        assert_eq!(
            redact("rediss://app:s3cret@cache.example.net:6380").as_deref(),
            Some("rediss://app:****@cache.example.net:6380")
        );
        assert_eq!(
            redact("redis://s3cret@redis").as_deref(),
            Some("redis://****@redis")
        );
        assert_eq!(
            redact("redis://127.0.0.1:6379").as_deref(),
            Some("redis://127.0.0.1:6379")
        );
        assert_eq!(redact("http://redis:6379"), None);
        assert_eq!(redact("unix:///run/redis.sock"), None);
        assert_eq!(redact("redis://:pw@"), None);
    }
}
