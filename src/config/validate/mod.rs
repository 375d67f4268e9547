//! From the raw YAML schema to the typed [`Config`]: `${…}` expansion, parsing of every
//! string setting, defaults, and the cross-field rules.
//!
//! Every problem is collected, none stops the walk; each carries the YAML path of the field
//! and says how to fix it. Messages never contain a secret value: they name variables,
//! files and fields instead.
//!
//! One file per YAML section (`server`, `credentials` with `secrets`, `clients`, `routes`,
//! `secret_stores` in `stores`);
//! the field types they share are in `fields`, the pure parsers behind them in `parse`.

use super::raw::RawConfig;
use super::raw::RawServer;
use super::{Client, Config, Credential, Prepared, Problem, Route, SecretValues, Source};

/// Validates a parsed document. `Err` holds every problem found, in document order, with
/// the refusals of not-yet-supported settings last.
pub(super) fn validate(
    raw: &RawConfig,
    source: &Source,
    values: Option<&SecretValues>,
) -> Result<Config, Vec<Problem>> {
    let raw_stores = raw.secret_stores.as_ref().map_or(&[][..], |s| &s.0[..]);
    let mut v = Validator {
        source,
        problems: Vec::new(),
        store_names: raw_stores.iter().map(|(name, _)| name.clone()).collect(),
        references: Vec::new(),
        values,
    };
    let default_server = RawServer::default();
    let server = v.server(raw.server.as_ref().unwrap_or(&default_server));
    let admin = raw.admin.as_ref().and_then(|admin| v.admin(admin, &server));
    let cluster = raw.cluster.as_ref().and_then(|cluster| v.cluster(cluster));

    let raw_credentials = raw.credentials.as_ref().map_or(&[][..], |c| &c.0[..]);
    let mut credentials: Vec<Credential> = raw_credentials
        .iter()
        .filter_map(|(name, credential)| v.credential(name, credential))
        .collect();
    credentials.sort_by(|a, b| a.name.cmp(&b.name));

    // Whether it is set, even if its file is missing: that is reported on its own.
    let client_ca = raw
        .server
        .as_ref()
        .and_then(|s| s.tls.as_ref())
        .is_some_and(|tls| tls.client_ca_file.is_some());
    let raw_clients = raw.clients.as_ref().map_or(&[][..], |c| &c.0[..]);
    let clients: Vec<Client> = raw_clients
        .iter()
        .filter_map(|(name, client)| v.client(name, client, client_ca))
        .collect();
    v.unique_client_secrets(&clients);

    let names = Names {
        credentials: raw_credentials.iter().map(|(n, _)| n.as_str()).collect(),
        clients: raw_clients.iter().map(|(n, _)| n.as_str()).collect(),
    };
    let raw_routes = raw.routes.as_deref().unwrap_or_default();
    let mut prefixes: Vec<String> = Vec::new();
    let mut routes: Vec<Option<Route>> = Vec::with_capacity(raw_routes.len());
    for (index, route) in raw_routes.iter().enumerate() {
        let prefix = v.unique_prefix(index, route, &mut prefixes);
        routes.push(v.route(index, route, prefix, &server, &names, &credentials));
    }

    let secret_stores = v.secret_stores(raw_stores, &names, &credentials);

    if v.problems.is_empty() {
        Ok(Config {
            server,
            admin,
            cluster,
            credentials,
            clients,
            routes: routes.into_iter().flatten().collect(),
            secret_stores,
            prepared: Prepared::default(),
        })
    } else {
        Err(v.problems)
    }
}

/// Names defined in the document, valid or not, so that a broken definition does not also
/// make every reference to it "unknown".
struct Names<'a> {
    credentials: Vec<&'a str>,
    clients: Vec<&'a str>,
}

struct Validator<'s> {
    source: &'s Source,
    problems: Vec<Problem>,
    /// Names under `secret_stores`, valid or not.
    store_names: Vec<String>,
    /// The `${secret:…}` references met so far.
    references: Vec<super::SecretReference>,
    /// Values for those references: `None` in stage one (placeholders stand for them),
    /// then every referenced secret must be there.
    values: Option<&'s SecretValues>,
}

mod clients;
mod cluster;
mod credentials;
mod fields;
mod parse;

pub(crate) use parse::{is_guid, is_loopback_host};
mod routes;
mod secrets;
mod server;
mod stores;
