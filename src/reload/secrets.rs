//! The background refresh of secret-store values (README "Secrets from Azure Key Vault").
//!
//! Every store's referenced secrets are read again each `refresh`. When a secret has a new
//! version, the running configuration is validated again with the new value and applied
//! like a reload: the credentials that use the secret get a new token slot, so they fetch
//! a token with the new secret at once, while every other credential keeps its tokens and
//! requests already running finish on the pipeline they started with. The old value is
//! dropped with its generation and wiped (`crate::secret::Secret`). A read that fails
//! keeps the last values; it is logged once per outage and once on recovery, and counted
//! in `s2s_proxy_secret_refreshes_total{store,outcome}` like every other read.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{info, warn};

use super::{Generation, Runtime};
use crate::config::{Config, Credential, SecretStore, SecretValues};
use crate::metrics::SecretRefresh;
use crate::secret_store::Vault;

/// How often a configuration without secret stores is looked at again (a reload may add
/// some).
const IDLE_CHECK: Duration = Duration::from_secs(30);

/// Reads the secret stores of the running configuration every `refresh` until aborted.
pub(crate) async fn refresh(runtime: Arc<Runtime>) {
    // Each store's client, with the settings it was built from (store and credential).
    let mut vaults: HashMap<String, (VaultKey, Arc<Vault>)> = HashMap::new();
    let mut due: HashMap<String, Instant> = HashMap::new();
    let mut failing: HashSet<String> = HashSet::new();
    loop {
        let stores = runtime.current().config.secret_stores.stores.clone();
        due.retain(|name, _| stores.iter().any(|s| &s.name == name));
        for store in &stores {
            due.entry(store.name.clone())
                .or_insert_with(|| Instant::now() + store.refresh);
        }
        let next = due
            .values()
            .min()
            .copied()
            .unwrap_or_else(|| Instant::now() + IDLE_CHECK);
        tokio::time::sleep_until(next).await;

        // The configuration as it is now: a reload may have happened while sleeping.
        let generation = runtime.current();
        let config = &generation.config;
        let stores = &config.secret_stores.stores;
        vaults.retain(|name, (key, _)| vault_key(config, name).as_ref() == Some(key));
        let now = Instant::now();
        let mut values = config.secret_stores.values.clone();
        let mut updated = false;
        for store in stores {
            if due.get(&store.name).is_none_or(|at| *at > now) {
                continue;
            }
            due.insert(store.name.clone(), now + store.refresh);
            let vault = match vaults.get(&store.name) {
                Some((_, vault)) => Arc::clone(vault),
                None => {
                    let built = Vault::new(
                        config,
                        &store.name,
                        &runtime.tls,
                        crate::secret_store::refresh_timeout(store.refresh),
                    );
                    let (Some(vault), Some(key)) = (built, vault_key(config, &store.name)) else {
                        continue;
                    };
                    let vault = Arc::new(vault);
                    vaults.insert(store.name.clone(), (key, Arc::clone(&vault)));
                    vault
                }
            };
            let outcome = refresh_store(config, &vault, &mut values, &mut failing).await;
            updated |= outcome == SecretRefresh::Updated;
            runtime.metrics.record_secret_refresh(&store.name, outcome);
        }
        if updated {
            apply(&runtime, &generation, values).await;
        }
    }
}

/// What a store's client is built from: the store's settings and its credential's.
type VaultKey = (SecretStore, Credential);

fn vault_key(config: &Config, store: &str) -> Option<VaultKey> {
    let store = config.secret_stores.store(store)?;
    let credential = config.credential(&store.credential)?;
    Some((store.clone(), credential.clone()))
}

/// Reads one store's secrets into `values`; the outcome for the metric.
async fn refresh_store(
    config: &Config,
    vault: &Vault,
    values: &mut SecretValues,
    failing: &mut HashSet<String>,
) -> SecretRefresh {
    let store = &vault.store().name;
    let mut changed = false;
    let mut failure = None;
    for (_, name) in config
        .secret_stores
        .wanted()
        .into_iter()
        .filter(|(s, _)| s == store)
    {
        match vault.read(&name).await {
            Ok(stored) => {
                let key = (store.clone(), name.clone());
                let known = values.0.get(&key);
                if known.is_none_or(|k| k.version != stored.version || k.value != stored.value) {
                    info!(store = %store, secret = %name, version = %stored.version, "Secret store has a new version of a secret; applying it.");
                    values.0.insert(key, stored);
                    changed = true;
                }
            }
            Err(error) => {
                failure.get_or_insert(error);
            }
        }
    }
    match failure {
        Some(error) => {
            if failing.insert(store.clone()) {
                warn!(store = %store, error = %error, "Secret store refresh failed; keeping the last values.");
            }
        }
        None => {
            if failing.remove(store) {
                info!(store = %store, "Secret store readable again.");
            }
        }
    }
    match (changed, failing.contains(store)) {
        (true, _) => SecretRefresh::Updated,
        (false, true) => SecretRefresh::Failed,
        (false, false) => SecretRefresh::Unchanged,
    }
}

/// Validates the running configuration again with `values` and applies it, off the
/// serving threads (the second stage reads files).
async fn apply(runtime: &Arc<Runtime>, generation: &Arc<Generation>, values: SecretValues) {
    let (applying, expected) = (Arc::clone(runtime), Arc::clone(generation));
    let result = tokio::task::spawn_blocking(move || {
        let next = expected
            .config
            .with_secret_values(values)
            .and_then(|next| crate::preflight::preflight_files(next, "secret_stores"))?;
        if !applying.is_draining() && !applying.apply_secrets(&expected, next) {
            info!("The configuration was reloaded meanwhile; its own secret values stay.");
        }
        Ok::<(), crate::config::ConfigError>(())
    })
    .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            for problem in error.problems() {
                warn!(problem = %problem, "Configuration problem with a new secret version.");
            }
            warn!("A new secret version was not applied; keeping the running configuration.");
        }
        Err(error) => {
            warn!(error = %error, "A new secret version was not applied; keeping the running configuration.");
        }
    }
}
