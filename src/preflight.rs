//! The second configuration stage: reads the files a validated [`Config`] names and
//! refuses what `run` could not use, with the YAML path of each problem, in the format of
//! the first stage (`path: message`). The first stage ([`Config::validate_yaml_str`]) is
//! pure and imports nothing above `config`; this stage knows the token, inbound TLS and
//! upstream TLS loaders.
//!
//! First it reads the `${secret:STORE/NAME}` values from their secret stores
//! (`crate::secret_store`; a secret that cannot be read is a problem at the field that
//! references it) and validates the document again with them. Then it reads
//! `server.upstream_ca_file` (the upstream CA roots), `server.tls.*` (inbound
//! certificate, key and client CA) and every `credentials.*.certificate_file(s)` with its
//! key. [`Config::load`] and [`Config::from_yaml_str`] run both stages, so `check`,
//! start-up and reload refuse the same files; reload calls it off the serving threads.
//! What it parsed (client certificates, the inbound key pair and client verifier, the
//! upstream roots) is kept in the configuration's `prepared` field for the token sources,
//! the expiry report and `Proxy::bind`, so that a load reads and parses each file once.

use std::path::Path;

use crate::config::{Config, ConfigError, CredentialKind, Problem, Source};

impl Config {
    /// Reads a configuration file and runs both stages, expanding variables from the
    /// process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let config = Self::validate_file(path)?;
        preflight(config, &Source::file(path).name)
    }

    /// Runs both stages on a YAML document: [`Config::validate_yaml_str`], then
    /// [`preflight`].
    pub fn from_yaml_str(text: &str, source: &Source) -> Result<Config, ConfigError> {
        let config = Self::validate_yaml_str(text, source)?;
        preflight(config, &source.name)
    }
}

/// Stage two: `config` if every file it names is usable, else every problem found. The
/// parsed client certificates and upstream roots travel in the returned configuration, so
/// that the token sources, expiry reports and the upstream client use them without reading
/// the files again.
pub(crate) fn preflight(config: Config, file: &str) -> Result<Config, ConfigError> {
    let config = if config.secret_stores.references.is_empty() {
        config
    } else {
        let values = crate::secret_store::read_at_start(&config).map_err(|problems| {
            ConfigError::Invalid {
                file: file.to_owned(),
                problems,
            }
        })?;
        config.with_secret_values(values)?
    };
    preflight_files(config, file)
}

/// The file part of stage two, for a configuration whose secret-store values are already
/// in place (a refresh that found a new version: `crate::reload`).
pub(crate) fn preflight_files(mut config: Config, file: &str) -> Result<Config, ConfigError> {
    let problems = problems(&mut config);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid {
            file: file.to_owned(),
            problems,
        })
    }
}

/// The problems of the files `config` names, in document order of the sections.
fn problems(config: &mut Config) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut problem = |path: String, message: String| problems.push(Problem { path, message });

    // Read as `run` does before it binds: `check` must refuse what `run` would.
    if let Some(path) = &config.server.upstream_ca_file {
        match crate::upstream::PreparedRoots::load(path) {
            Ok(roots) => config.prepared.insert(roots),
            Err(error) => problem("server.upstream_ca_file".to_owned(), error.to_string()),
        }
    }
    if let Some(tls) = &config.server.tls {
        match crate::inbound::tls::prepare(tls) {
            Ok(prepared) => config.prepared.insert(prepared),
            Err(problems) => {
                for (field, message) in problems {
                    problem(format!("server.tls.{field}"), message);
                }
            }
        }
    }
    let mut certificates = crate::token::PreparedCertificates::default();
    for credential in &config.credentials {
        let CredentialKind::ClientCertificate(settings) = &credential.kind else {
            continue;
        };
        let single = settings.certificates.len() == 1;
        for (index, certificate) in settings.certificates.iter().enumerate() {
            if let Err(message) =
                certificates.load(&credential.name, certificate, settings.assertion_alg)
            {
                let entry = if single {
                    "certificate_file".to_owned()
                } else {
                    format!("certificate_files[{index}]")
                };
                problem(format!("credentials.{}.{entry}", credential.name), message);
            }
        }
    }
    config.prepared.insert(certificates);
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::TempDir;

    /// Every file `run` reads is named, and none holds what it should.
    const YAML: &str = "server:\n  upstream_ca_file: ca.pem\n  \
        tls: { cert_file: tls.crt, key_file: tls.key }\n\
        credentials:\n  fo:\n    type: client_certificate\n    \
        tenant_id: contoso.onmicrosoft.com\n    client_id: fo-app\n    \
        certificate_file: fo.pem\n\
        clients:\n  c:\n    networks: [10.0.0.0/8]\n\
        routes:\n  - prefix: /fo/\n    upstream: https://contoso.operations.dynamics.com/\n    \
        credential: fo\n    clients: [c]\n";

    #[test]
    fn stage_one_reads_no_file_content_and_stage_two_reports_each_with_its_path() {
        let dir = TempDir::new("preflight");
        for file in ["ca.pem", "tls.crt", "tls.key", "fo.pem"] {
            dir.write(file, "not PEM\n");
        }
        let source = Source {
            name: "proxy.yaml".to_owned(),
            base_dir: dir.path().to_owned(),
            variables: crate::config::Variables::map(Default::default()),
        };

        let config = Config::validate_yaml_str(YAML, &source).expect("stage one is pure");
        let error = preflight(config, &source.name).expect_err("stage two reads the files");
        let paths: Vec<String> = error.problems().into_iter().map(|p| p.path).collect();
        assert_eq!(
            paths,
            [
                "server.upstream_ca_file",
                "server.tls.cert_file",
                "credentials.fo.certificate_file"
            ]
        );
        assert!(error.to_string().starts_with("proxy.yaml"), "{error}");

        // `from_yaml_str` (what `check`, `run` and reload use) runs both stages.
        let both = Config::from_yaml_str(YAML, &source).expect_err("refused");
        assert_eq!(both.problems(), error.problems());
    }

    /// The upstream roots are read by the loader and used from there: with the CA file
    /// deleted after loading, the upstream client's TLS settings still build, and are the
    /// ones with the extra root.
    #[test]
    fn the_upstream_roots_come_from_the_loader_not_from_the_file_again() {
        let dir = TempDir::new("preflight-roots");
        let ca = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/creds/a.crt"),
        )
        .unwrap();
        let path = dir.write("ca.pem", &ca);
        let source = Source {
            name: "proxy.yaml".to_owned(),
            base_dir: dir.path().to_owned(),
            variables: crate::config::Variables::map(
                [("S".to_owned(), "secret".to_owned())].into(),
            ),
        };
        let yaml = "server:\n  upstream_ca_file: ca.pem\n\
            credentials:\n  s:\n    type: client_secret\n    \
            tenant_id: contoso.onmicrosoft.com\n    client_id: s-app\n    \
            client_secret: ${S}\n\
            clients:\n  c:\n    networks: [10.0.0.0/8]\n\
            routes:\n  - prefix: /a/\n    upstream: https://contoso.example/\n    \
            credential: s\n    clients: [c]\n";
        let config = Config::from_yaml_str(yaml, &source).expect("valid");
        std::fs::remove_file(&path).unwrap();
        assert!(crate::upstream::client_tls_for(&config).is_ok());

        // Without what the loader prepared, the file is read again, and it is gone.
        let mut unprepared = config;
        unprepared.prepared = crate::config::Prepared::default();
        assert!(crate::upstream::client_tls_for(&unprepared).is_err());
    }

    /// `server.tls` likewise: with the certificate and key deleted after loading, the
    /// listener's TLS configuration still builds from what the loader read.
    #[test]
    fn the_inbound_key_pair_comes_from_the_loader_not_from_the_files_again() {
        let dir = TempDir::new("preflight-inbound");
        let fixture = |name: &str| {
            std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/creds")
                    .join(name),
            )
            .unwrap()
        };
        let cert = dir.write("tls.crt", &fixture("a.crt"));
        let key = dir.write("tls.key", &fixture("a.pem"));
        let source = Source {
            name: "proxy.yaml".to_owned(),
            base_dir: dir.path().to_owned(),
            variables: crate::config::Variables::map(
                [("S".to_owned(), "secret".to_owned())].into(),
            ),
        };
        let yaml = "server:\n  tls: { cert_file: tls.crt, key_file: tls.key }\n\
            credentials:\n  s:\n    type: client_secret\n    \
            tenant_id: contoso.onmicrosoft.com\n    client_id: s-app\n    \
            client_secret: ${S}\n\
            clients:\n  c:\n    networks: [10.0.0.0/8]\n\
            routes:\n  - prefix: /a/\n    upstream: https://contoso.example/\n    \
            credential: s\n    clients: [c]\n";
        let config = Config::from_yaml_str(yaml, &source).expect("valid");
        std::fs::remove_file(&cert).unwrap();
        std::fs::remove_file(&key).unwrap();
        let built = crate::inbound::tls::InboundTls::for_config(&config).expect("prepared");
        assert!(built.is_some());

        let mut unprepared = config;
        unprepared.prepared = crate::config::Prepared::default();
        assert!(crate::inbound::tls::InboundTls::for_config(&unprepared).is_err());
    }
}
