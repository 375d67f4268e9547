//! `s2s-proxy init`: turn an Entra ID app registration into a first working `proxy.yaml`
//! and `s2s-proxy.env`.
//!
//! This module owns the answers (product, tenant, client ID, secret, environment or URL,
//! client name), their validation as typed, the two files it writes and loading them back
//! for `doctor`; [`prompt`] owns the interactive dialogue and hidden input. It does not own
//! the configuration schema: what it writes is ordinary `proxy.yaml`, checked by the same
//! loader as `check` and `run` before anything is written.
//!
//! Secrets never go into `proxy.yaml`: it refers to `${VAR}`s that `s2s-proxy.env` (mode
//! 0600, created exclusively unless `--force`) defines, in a form `sh` (`set -a; . FILE`)
//! and systemd's `EnvironmentFile=` both read.

pub mod prompt;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::{self, Read, Write as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::rand::{SecureRandom as _, SystemRandom};

use crate::config::{Config, ConfigError, Source, Variables, is_guid};
use crate::secret::Secret;

/// The configuration file `init` writes.
pub const CONFIG_FILE: &str = "proxy.yaml";
/// The environment file holding the secrets `proxy.yaml` refers to.
pub const ENV_FILE: &str = "s2s-proxy.env";
/// Client name offered when none is typed.
pub const DEFAULT_CLIENT_NAME: &str = "erp-sync";
/// Business Central environment offered when none is typed.
pub const DEFAULT_ENVIRONMENT: &str = "Production";
/// Where the written configuration listens (loopback until the operator opens it up).
pub const LISTEN: &str = "127.0.0.1:8080";

/// The Dynamics 365 product behind the route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Product {
    BusinessCentral,
    FinanceOperations,
    Dataverse,
}

impl Product {
    pub const ALL: [Product; 3] = [
        Self::BusinessCentral,
        Self::FinanceOperations,
        Self::Dataverse,
    ];

    /// The name an operator knows it by.
    pub fn label(self) -> &'static str {
        match self {
            Self::BusinessCentral => "Business Central",
            Self::FinanceOperations => "Finance & Operations",
            Self::Dataverse => "Dataverse",
        }
    }

    /// The value of `--product`.
    pub fn flag(self) -> &'static str {
        match self {
            Self::BusinessCentral => "business-central",
            Self::FinanceOperations => "finance-operations",
            Self::Dataverse => "dataverse",
        }
    }

    fn credential(self) -> &'static str {
        match self {
            Self::BusinessCentral => "bc",
            Self::FinanceOperations => "fo",
            Self::Dataverse => "dataverse",
        }
    }

    fn prefix(self) -> &'static str {
        match self {
            Self::BusinessCentral => "/bc/",
            Self::FinanceOperations => "/fo/",
            Self::Dataverse => "/dataverse/",
        }
    }

    /// The variable holding the client secret.
    pub fn secret_var(self) -> &'static str {
        match self {
            Self::BusinessCentral => "BC_CLIENT_SECRET",
            Self::FinanceOperations => "FO_CLIENT_SECRET",
            Self::Dataverse => "DATAVERSE_CLIENT_SECRET",
        }
    }

    /// Parses what an operator types at the product question.
    pub fn parse(text: &str) -> Result<Product, String> {
        let text = text.trim().to_ascii_lowercase();
        match text.as_str() {
            "1" | "bc" | "business central" | "business-central" | "businesscentral" => {
                Ok(Self::BusinessCentral)
            }
            "2"
            | "fo"
            | "f&o"
            | "fno"
            | "finance & operations"
            | "finance and operations"
            | "finance-operations"
            | "finance_operations" => Ok(Self::FinanceOperations),
            "3" | "dataverse" | "crm" | "ce" => Ok(Self::Dataverse),
            _ => Err(
                "expected 1 (Business Central), 2 (Finance & Operations) or 3 (Dataverse)"
                    .to_owned(),
            ),
        }
    }
}

/// Where the route goes: a Business Central environment name, or the environment URL of
/// Finance & Operations or Dataverse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Environment(String),
    Url(String),
}

/// Everything `init` needs to write the files.
#[derive(Debug, Clone)]
pub struct Answers {
    pub product: Product,
    pub tenant_id: String,
    pub client_id: String,
    pub client_secret: Secret,
    pub target: Target,
    pub client_name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// A bad or missing command-line value (exit 2).
    #[error("{0}")]
    Usage(String),
    #[error("{} already exist{}; pass --force to overwrite", list(.0), if .0.len() == 1 { "s" } else { "" })]
    Exists(Vec<PathBuf>),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("the input ended before {0} was answered")]
    InputEnded(&'static str),
    #[error("client secret: {0}")]
    Secret(String),
    #[error("{file}:{line}: {message}")]
    EnvFile {
        file: String,
        line: usize,
        message: String,
    },
    /// The written configuration does not load (for `doctor`), or, before writing, the
    /// rendered one does not validate: a bug in `init`.
    #[error("{0}")]
    Config(ConfigError),
}

fn list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(" and ")
}

fn io_error(what: impl Into<String>) -> impl FnOnce(io::Error) -> InitError {
    let what = what.into();
    move |source| InitError::Io { what, source }
}

// ---------------------------------------------------------------------------------------
// Validation of what is typed
// ---------------------------------------------------------------------------------------

const GUID_EXAMPLE: &str = "5f0c8e1a-3b2d-4c6e-9a7f-0d1e2f3a4b5c";

/// A GUID as pasted (braces and surrounding spaces tolerated), lowercased.
pub fn parse_guid(text: &str) -> Result<String, String> {
    let value = text.trim().trim_start_matches('{').trim_end_matches('}');
    if is_guid(value) {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(format!(
            "`{}` is not a GUID; expected 8-4-4-4-12 hexadecimal digits such as {GUID_EXAMPLE}",
            shorten(text.trim())
        ))
    }
}

/// The directory (tenant) ID, or a verified domain such as `contoso.onmicrosoft.com`.
pub fn parse_tenant(text: &str) -> Result<String, String> {
    if let Ok(guid) = parse_guid(text) {
        return Ok(guid);
    }
    let value = text.trim();
    let labels: Vec<&str> = value.split('.').collect();
    let domain = labels.len() >= 2
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
        && labels
            .last()
            .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_alphabetic()));
    if domain {
        Ok(value.to_ascii_lowercase())
    } else {
        Err(format!(
            "`{}` is not a tenant ID; expected the directory (tenant) ID GUID such as \
             {GUID_EXAMPLE}, or a verified domain such as contoso.onmicrosoft.com",
            shorten(value)
        ))
    }
}

/// A Business Central environment name as shown in the admin center.
pub fn parse_environment(text: &str) -> Result<String, String> {
    let value = text.trim();
    if !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "`{}` is not an environment name; use the name from the Business Central admin \
             center (letters, digits, `-` and `_`), e.g. Production or Sandbox",
            shorten(value)
        ))
    }
}

/// The environment URL of Finance & Operations or Dataverse: `https://host`, no path.
pub fn parse_service_url(product: Product, text: &str) -> Result<String, String> {
    let example = match product {
        Product::Dataverse => "https://contoso.crm4.dynamics.com",
        Product::FinanceOperations | Product::BusinessCentral => {
            "https://contoso.operations.dynamics.com"
        }
    };
    let value = text.trim().trim_end_matches('/');
    let shown = shorten(value);
    let Some(rest) = value.strip_prefix("https://") else {
        return Err(format!(
            "`{shown}` is not an https:// URL; expected the environment URL, e.g. {example}"
        ));
    };
    if rest.contains(['/', '?', '#']) {
        return Err(format!(
            "`{shown}` has a path; write the environment URL only, e.g. {example} (the proxy \
             adds {})",
            match product {
                Product::Dataverse => "/api/data/v9.2/",
                Product::FinanceOperations | Product::BusinessCentral => "/data/",
            }
        ));
    }
    let uri: http::Uri = value
        .parse()
        .map_err(|_| format!("`{shown}` is not a valid URL; expected e.g. {example}"))?;
    let host = uri.host().unwrap_or_default().to_ascii_lowercase();
    let labels_ok = host.contains('.')
        && host
            .split('.')
            .all(|l| !l.is_empty() && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'));
    if rest.contains('@') || !labels_ok {
        return Err(format!(
            "`{shown}` is not an environment URL; expected e.g. {example}"
        ));
    }
    // The three products' URLs are easy to mix up when copying from admin centers.
    let other = if host.ends_with("businesscentral.dynamics.com") {
        Some(Product::BusinessCentral)
    } else if product == Product::FinanceOperations && host.contains(".crm") {
        Some(Product::Dataverse)
    } else if product == Product::Dataverse && host.contains(".operations.") {
        Some(Product::FinanceOperations)
    } else {
        None
    };
    if let Some(other) = other {
        return Err(format!(
            "`{shown}` looks like a {} URL, not {}; choose the product {} instead",
            other.label(),
            product.label(),
            other.label()
        ));
    }
    Ok(format!("https://{}", uri.authority().map_or("", |a| a.as_str())).to_ascii_lowercase())
}

/// A client name: it becomes the Basic user name and shows up in logs and metric labels.
pub fn parse_client_name(text: &str) -> Result<String, String> {
    let value = text.trim();
    if !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(value.to_owned())
    } else {
        Err(format!(
            "`{}` is not a client name; use letters, digits, `-` and `_` (up to 64), e.g. \
             {DEFAULT_CLIENT_NAME}",
            shorten(value)
        ))
    }
}

/// Checks a client secret value. Never echoes it.
pub fn check_secret(secret: &str) -> Result<(), String> {
    if secret.is_empty() {
        return Err("empty; paste the secret's Value".to_owned());
    }
    if secret.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(
            "contains spaces or control characters; paste the secret's Value only".to_owned(),
        );
    }
    Ok(())
}

/// Whether `secret` looks like the secret's ID (a GUID) rather than its value: the classic
/// cause of AADSTS7000215 "Invalid client secret provided".
pub fn secret_looks_like_id(secret: &str) -> bool {
    is_guid(secret.trim())
}

/// The warning printed when [`secret_looks_like_id`].
pub const SECRET_ID_WARNING: &str = "the client secret looks like a GUID: that is usually the \
     secret's ID, not its Value. Entra ID refuses the ID with AADSTS7000215 (invalid client \
     secret). In the Entra admin center, App registrations > Certificates & secrets, copy the \
     Value column (shown only right after the secret was created).";

/// At most 60 characters of what was typed, for error messages.
fn shorten(text: &str) -> String {
    let mut out: String = text.chars().filter(|c| !c.is_control()).take(60).collect();
    if text.chars().count() > 60 {
        out.push('…');
    }
    out
}

/// Reads the client secret from standard input (non-interactive mode): the whole input,
/// trailing newline trimmed.
pub fn read_secret(mut input: impl Read) -> Result<Secret, InitError> {
    let mut bytes = zeroize::Zeroizing::new(Vec::new());
    input
        .read_to_end(&mut bytes)
        .map_err(io_error("reading the client secret from standard input"))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| InitError::Secret("standard input is not UTF-8".to_owned()))?;
    let secret = Secret::new(text.trim_end_matches(['\n', '\r']));
    check_secret(secret.expose()).map_err(InitError::Secret)?;
    Ok(secret)
}

// ---------------------------------------------------------------------------------------
// Non-interactive answers
// ---------------------------------------------------------------------------------------

/// Answers given as command-line flags. In interactive mode they skip their questions.
#[derive(Debug, Clone, Default)]
pub struct Flags {
    pub product: Option<Product>,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub environment: Option<String>,
    pub url: Option<String>,
    pub client_name: Option<String>,
}

/// Validated flag values; `None` where a flag was not given.
#[derive(Debug, Clone, Default)]
pub struct Given {
    pub product: Option<Product>,
    pub tenant_id: Option<String>,
    pub client_id: Option<String>,
    pub target: Option<Target>,
    pub client_name: Option<String>,
}

impl Flags {
    /// Validates each given flag; a bad value is a usage error naming the flag.
    pub fn validate(&self) -> Result<Given, InitError> {
        fn flag<T>(
            name: &str,
            value: Option<&String>,
            parse: impl Fn(&str) -> Result<T, String>,
        ) -> Result<Option<T>, InitError> {
            value
                .map(|v| parse(v).map_err(|message| InitError::Usage(format!("{name}: {message}"))))
                .transpose()
        }
        let tenant_id = flag("--tenant-id", self.tenant_id.as_ref(), parse_tenant)?;
        let client_id = flag("--client-id", self.client_id.as_ref(), parse_guid)?;
        let client_name = flag(
            "--client-name",
            self.client_name.as_ref(),
            parse_client_name,
        )?;
        let environment = flag(
            "--environment",
            self.environment.as_ref(),
            parse_environment,
        )?;
        let target = match (self.product, environment, self.url.as_ref()) {
            (_, Some(_), Some(_)) => {
                return Err(InitError::Usage(
                    "--environment and --url cannot be used together".to_owned(),
                ));
            }
            (Some(Product::BusinessCentral), None, Some(_)) => {
                return Err(InitError::Usage(
                    "--url is for Finance & Operations and Dataverse; Business Central takes \
                     --environment NAME"
                        .to_owned(),
                ));
            }
            (Some(product @ (Product::FinanceOperations | Product::Dataverse)), Some(_), None) => {
                return Err(InitError::Usage(format!(
                    "--environment is for Business Central; {} takes --url URL",
                    product.label()
                )));
            }
            (Some(product), None, Some(url)) => Some(Target::Url(
                parse_service_url(product, url)
                    .map_err(|message| InitError::Usage(format!("--url: {message}")))?,
            )),
            (_, Some(environment), None) => Some(Target::Environment(environment)),
            (None, None, Some(_)) => {
                return Err(InitError::Usage(
                    "--url needs --product finance-operations or dataverse".to_owned(),
                ));
            }
            (_, None, None) => None,
        };
        Ok(Given {
            product: self.product,
            tenant_id,
            client_id,
            target,
            client_name,
        })
    }

    /// The answers of `--non-interactive`: every flag required, the secret given.
    /// Returns the answers and warnings to show.
    pub fn into_answers(self, secret: Secret) -> Result<(Answers, Vec<String>), InitError> {
        let given = self.validate()?;
        let missing = |name: &str| InitError::Usage(format!("--non-interactive needs {name}"));
        let product = given.product.ok_or_else(|| missing("--product"))?;
        let target = match (product, given.target) {
            (Product::BusinessCentral, None) => Target::Environment(DEFAULT_ENVIRONMENT.to_owned()),
            (_, Some(target)) => target,
            (product @ (Product::FinanceOperations | Product::Dataverse), None) => {
                return Err(InitError::Usage(format!(
                    "--product {} needs --url URL, the environment URL",
                    product.flag()
                )));
            }
        };
        let answers = Answers {
            product,
            tenant_id: given.tenant_id.ok_or_else(|| missing("--tenant-id"))?,
            client_id: given.client_id.ok_or_else(|| missing("--client-id"))?,
            client_secret: secret,
            target,
            client_name: given.client_name.ok_or_else(|| missing("--client-name"))?,
        };
        let mut warnings = Vec::new();
        if secret_looks_like_id(answers.client_secret.expose()) {
            warnings.push(SECRET_ID_WARNING.to_owned());
        }
        Ok((answers, warnings))
    }
}

// ---------------------------------------------------------------------------------------
// The files
// ---------------------------------------------------------------------------------------

/// The variable holding a client's Basic password: `ERP_SYNC_PASSWORD` for `erp-sync`.
pub fn password_var(client_name: &str) -> String {
    let upper = client_name.to_ascii_uppercase().replace('-', "_");
    if upper.starts_with(|c: char| c.is_ascii_digit()) {
        format!("CLIENT_{upper}_PASSWORD")
    } else {
        format!("{upper}_PASSWORD")
    }
}

impl Answers {
    fn scope(&self) -> String {
        match &self.target {
            Target::Url(url) => format!("{url}/.default"),
            Target::Environment(_) => {
                "https://api.businesscentral.dynamics.com/.default".to_owned()
            }
        }
    }

    fn upstream(&self) -> String {
        match (&self.target, self.product) {
            (Target::Environment(environment), _) => format!(
                "{{ businesscentral: {{ tenant: \"{}\", environment: \"{environment}\" }} }}",
                self.tenant_id
            ),
            (Target::Url(url), Product::Dataverse) => {
                format!("{{ dataverse: {{ url: \"{url}\" }} }}")
            }
            (Target::Url(url), Product::FinanceOperations | Product::BusinessCentral) => {
                format!("{{ finance_operations: {{ url: \"{url}\" }} }}")
            }
        }
    }

    /// `proxy.yaml`: no secret in it, only `${VAR}` references to the env file.
    pub fn render_config(&self) -> String {
        let product = self.product;
        let (credential, secret_var) = (product.credential(), product.secret_var());
        let client = &self.client_name;
        let password_var = password_var(client);
        let mut yaml = String::new();
        let _ = write!(
            yaml,
            "# s2s-proxy configuration for {label}, written by `s2s-proxy init`.\n\
             # No secret is written here: ${{{secret_var}}} and ${{{password_var}}} come from\n\
             # {ENV_FILE}. Load it first:  set -a; . ./{ENV_FILE}; set +a\n\
             \n\
             server:\n\
             \x20 listen: {LISTEN}   # 0.0.0.0:8080 to accept other machines\n\
             admin:\n\
             \x20 listen: 127.0.0.1:9090   # /healthz, /readyz, /metrics\n\
             \n\
             credentials:\n\
             \x20 {credential}:\n\
             \x20   type: client_secret\n\
             \x20   tenant_id: \"{tenant}\"\n\
             \x20   client_id: \"{client_id}\"\n\
             \x20   client_secret: ${{{secret_var}}}\n\
             \n\
             clients:\n\
             \x20 {client}:\n\
             \x20   basic: {{ username: {client}, password: \"${{{password_var}}}\" }}\n\
             \n\
             routes:\n\
             \x20 - prefix: {prefix}\n\
             \x20   upstream: {upstream}\n\
             \x20   scope: {scope}\n\
             \x20   credential: {credential}\n\
             \x20   clients: [{client}]\n",
            label = product.label(),
            tenant = self.tenant_id,
            client_id = self.client_id,
            prefix = product.prefix(),
            upstream = self.upstream(),
            scope = self.scope(),
        );
        yaml
    }
}

/// `NAME=value` lines for `sh` and systemd: bare when the value needs no quoting, else in
/// single quotes (POSIX shell quoting; a `'` inside is written `'\''`).
fn env_line(name: &str, value: &str) -> String {
    format!("{name}={}\n", shell_word(value))
}

/// `value` as one shell word.
pub fn shell_word(value: &str) -> String {
    let bare = !value.is_empty()
        && !value.starts_with('~')
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.,/@%+=~-".contains(c));
    if bare {
        value.to_owned()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

/// Parses an env file as written by `init` (and the common hand-written forms): comments,
/// blank lines, an optional `export `, `NAME=value` with bare, `'…'` or `"…"` values.
pub fn parse_env_file(text: &str, file: &str) -> Result<Vec<(String, String)>, InitError> {
    let mut out = Vec::new();
    for (index, line) in text.lines().enumerate() {
        let error = |message: &str| InitError::EnvFile {
            file: file.to_owned(),
            line: index + 1,
            message: message.to_owned(),
        };
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((name, raw)) = line.split_once('=') else {
            return Err(error("expected NAME=value"));
        };
        let valid_name = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(error("invalid variable name"));
        }
        let value = unquote(raw).ok_or_else(|| error("unterminated quote"))?;
        out.push((name.to_owned(), value));
    }
    Ok(out)
}

/// One shell word: bare characters, `'…'`, `"…"` (with `\` escapes) and `\x`, up to the
/// first unquoted blank (after which only a comment may follow).
fn unquote(raw: &str) -> Option<String> {
    let mut value = String::new();
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => loop {
                match chars.next()? {
                    '\'' => break,
                    c => value.push(c),
                }
            },
            '"' => loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => match chars.next()? {
                        c @ ('"' | '\\' | '$' | '`') => value.push(c),
                        c => {
                            value.push('\\');
                            value.push(c);
                        }
                    },
                    c => value.push(c),
                }
            },
            '\\' => value.push(chars.next()?),
            c if c.is_whitespace() => break,
            c => value.push(c),
        }
    }
    Some(value)
}

/// What `init` wrote.
#[derive(Debug)]
pub struct Written {
    pub config: PathBuf,
    pub env: PathBuf,
    /// The generated Basic password of the client, to print once.
    pub password: Secret,
    pub product: Product,
    pub client_name: String,
    pub password_var: String,
    pub prefix: &'static str,
}

/// The paths `init` writes in `dir`.
pub fn paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join(CONFIG_FILE), dir.join(ENV_FILE))
}

/// Refuses, before any question is asked, when a file exists and `force` is off.
pub fn preflight(dir: &Path, force: bool) -> Result<(), InitError> {
    if force {
        return Ok(());
    }
    let (config, env) = paths(dir);
    let existing: Vec<PathBuf> = [config, env]
        .into_iter()
        .filter(|p| p.symlink_metadata().is_ok())
        .collect();
    if existing.is_empty() {
        Ok(())
    } else {
        Err(InitError::Exists(existing))
    }
}

/// A strong random password: 32 bytes from the OS generator, base64url (43 characters,
/// no quoting needed anywhere).
fn generate_password() -> Result<Secret, InitError> {
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(bytes.as_mut())
        .map_err(|_| InitError::Io {
            what: "generating a password".to_owned(),
            source: io::Error::other("the system random generator failed"),
        })?;
    Ok(Secret::new(URL_SAFE_NO_PAD.encode(bytes.as_ref())))
}

/// Writes `proxy.yaml` and `s2s-proxy.env` (mode 0600) in `dir`, creating `dir` if needed.
/// Without `force` an existing file is never touched. The configuration is validated with
/// the real values first, so what is written is what `check` accepts.
pub fn write(answers: &Answers, dir: &Path, force: bool) -> Result<Written, InitError> {
    std::fs::create_dir_all(dir).map_err(io_error(format!("creating {}", dir.display())))?;
    preflight(dir, force)?;
    let (config_path, env_path) = paths(dir);
    let password = generate_password()?;
    let password_var = password_var(&answers.client_name);
    let secret_var = answers.product.secret_var();
    let yaml = answers.render_config();

    let source = Source {
        name: config_path.display().to_string(),
        base_dir: dir.to_path_buf(),
        variables: Variables::map(HashMap::from([
            (
                secret_var.to_owned(),
                answers.client_secret.expose().to_owned(),
            ),
            (password_var.clone(), password.expose().to_owned()),
        ])),
    };
    Config::from_yaml_str(&yaml, &source).map_err(InitError::Config)?;

    let env = zeroize::Zeroizing::new(format!(
        "# Secrets for {CONFIG_FILE}, written by `s2s-proxy init`. Keep this file private\n\
         # (mode 0600) and out of version control.\n\
         # Shell:   set -a; . ./{ENV_FILE}; set +a\n\
         # systemd: EnvironmentFile={}\n\
         {}{}",
        std::path::absolute(&env_path)
            .unwrap_or_else(|_| env_path.clone())
            .display(),
        env_line(secret_var, answers.client_secret.expose()),
        env_line(&password_var, password.expose()),
    ));
    write_file(&env_path, env.as_bytes(), force, 0o600)?;
    write_file(&config_path, yaml.as_bytes(), force, 0o644)?;
    Ok(Written {
        config: config_path,
        env: env_path,
        password,
        product: answers.product,
        client_name: answers.client_name.clone(),
        password_var,
        prefix: answers.product.prefix(),
    })
}

/// Creates `path` exclusively (O_EXCL) unless `force`, with `mode`; an overwritten file
/// gets `mode` too, so a forced run never leaves secrets world-readable.
fn write_file(path: &Path, bytes: &[u8], force: bool, mode: u32) -> Result<(), InitError> {
    let what = || format!("writing {}", path.display());
    let mut options = std::fs::OpenOptions::new();
    options.write(true);
    if force {
        options.create(true).truncate(true);
    } else {
        options.create_new(true);
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(mode);
    }
    let mut file = options.open(path).map_err(|source| match source.kind() {
        io::ErrorKind::AlreadyExists => InitError::Exists(vec![path.to_path_buf()]),
        _ => InitError::Io {
            what: what(),
            source,
        },
    })?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(mode))
            .map_err(io_error(what()))?;
    }
    #[cfg(not(unix))]
    let _ = mode;
    file.write_all(bytes).map_err(io_error(what()))?;
    file.sync_all().map_err(io_error(what()))
}

/// What to print after writing: the password (its only appearance on screen), where the
/// files are and the next commands.
pub fn summary(written: &Written) -> String {
    let config = shell_word(&written.config.display().to_string());
    let env = shell_word(&written.env.display().to_string());
    let env_source = if env.starts_with(['/', '.', '\'']) {
        env.clone()
    } else {
        format!("./{env}")
    };
    let grant = match written.product {
        Product::BusinessCentral => {
            "In Business Central, open the \"Microsoft Entra Applications\" page, add the \
             client ID, set State to Enabled and assign permission sets (not SUPER)."
        }
        Product::FinanceOperations => {
            "In Finance & Operations, add the client ID under System administration > Setup > \
             Microsoft Entra applications and map it to a user with the needed roles."
        }
        Product::Dataverse => {
            "In the Power Platform admin center, add the app as an application user of the \
             environment and give it a security role."
        }
    };
    format!(
        "\nWrote {config} and {env} (mode 0600, holds the secrets).\n\
         \n\
         Password of client \"{name}\", shown only this once (it is also {var} in {env}):\n\
         \n\
         \x20   {password}\n\
         \n\
         Callers use HTTP Basic with user \"{name}\" and this password, at\n\
         http://{LISTEN}{prefix}\n\
         \n\
         {grant}\n\
         \n\
         Next:\n\
         \x20 set -a; . {env_source}; set +a\n\
         \x20 s2s-proxy check --config {config}    # validate, print the route table\n\
         \x20 s2s-proxy doctor --config {config}   # fetch a token, call {label} once\n\
         \x20 s2s-proxy run --config {config}      # serve on {LISTEN}\n\
         \n\
         The first line loads {env} into the shell; check, doctor and run need its variables.\n",
        name = written.client_name,
        var = written.password_var,
        password = written.password.expose(),
        prefix = written.prefix,
        label = written.product.label(),
    )
}

/// Loads the written configuration with the env file's variables over the process
/// environment, as `doctor` right after `init` needs it.
pub fn load_with_env_file(config: &Path, env: &Path) -> Result<Config, InitError> {
    let env_text = zeroize::Zeroizing::new(
        std::fs::read_to_string(env).map_err(io_error(format!("reading {}", env.display())))?,
    );
    let mut variables: HashMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    variables.extend(parse_env_file(&env_text, &env.display().to_string())?);
    let text = std::fs::read_to_string(config)
        .map_err(io_error(format!("reading {}", config.display())))?;
    let source = Source {
        name: config.display().to_string(),
        base_dir: config
            .parent()
            .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
        variables: Variables::map(variables),
    };
    Config::from_yaml_str(&text, &source).map_err(InitError::Config)
}

#[cfg(test)]
mod tests;
