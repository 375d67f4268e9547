//! The `s2s-proxy` command line: parse arguments, set up logging and the runtime, call
//! into the library. Exit codes: 0 ok, 1 configuration or runtime error, 2 usage error.

use std::io::{IsTerminal as _, Read as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use s2s_proxy::{Config, Proxy, init, report, secret::Secret};

#[derive(Debug, Parser)]
#[command(
    name = "s2s-proxy",
    version,
    about = "Authenticating reverse proxy that injects OAuth 2.0 service-to-service tokens"
)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, clap::Args)]
struct ConfigArg {
    /// Configuration file.
    #[arg(long, env = "S2S_PROXY_CONFIG", default_value = "proxy.yaml")]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve.
    Run(ConfigArg),
    /// Validate the configuration and print the route table.
    Check(ConfigArg),
    /// Fetch a token for a route and print its decoded claims.
    Token {
        /// Route prefix, e.g. /bc/
        #[arg(long)]
        route: String,
        /// Also print the raw access token.
        #[arg(long)]
        raw: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// For every route, fetch a token and call the upstream once; explain each failure.
    Doctor(ConfigArg),
    /// Read a secret on stdin and print its sha256: form for `clients:`.
    HashSecret,
    /// Run a self-contained demo on loopback: token issuer, sample upstream and the proxy.
    Dev {
        /// Where the demo proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
    /// Ask for an Entra app's IDs and secret; write proxy.yaml and s2s-proxy.env.
    Init(InitArgs),
    /// Print the JSON Schema (draft 2020-12) of proxy.yaml, for editors and CI.
    Schema,
    /// GET an admin endpoint; exit 0 on a 2xx answer (container HEALTHCHECK).
    Healthcheck {
        #[arg(long, default_value = s2s_proxy::DEFAULT_HEALTHCHECK_URL)]
        url: String,
    },
}

#[derive(Debug, clap::Args)]
struct InitArgs {
    /// Take every answer from the flags and the client secret from standard input.
    #[arg(long)]
    non_interactive: bool,
    /// The Dynamics 365 product.
    #[arg(long, value_enum, required_if_eq("non_interactive", "true"))]
    product: Option<ProductArg>,
    /// Directory (tenant) ID: a GUID, or a verified domain.
    #[arg(long, value_name = "ID", required_if_eq("non_interactive", "true"))]
    tenant_id: Option<String>,
    /// Application (client) ID of the app registration.
    #[arg(long, value_name = "ID", required_if_eq("non_interactive", "true"))]
    client_id: Option<String>,
    /// Business Central environment [default: Production].
    #[arg(long, value_name = "NAME", conflicts_with = "url")]
    environment: Option<String>,
    /// Finance & Operations or Dataverse environment URL.
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Name of the calling client; also its Basic user name.
    #[arg(long, value_name = "NAME", required_if_eq("non_interactive", "true"))]
    client_name: Option<String>,
    /// Directory to write proxy.yaml and s2s-proxy.env into (created if missing)
    /// [default in interactive mode: the current directory].
    #[arg(long, value_name = "DIR", required_if_eq("non_interactive", "true"))]
    dir: Option<PathBuf>,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum ProductArg {
    BusinessCentral,
    FinanceOperations,
    Dataverse,
}

impl From<ProductArg> for init::Product {
    fn from(product: ProductArg) -> Self {
        match product {
            ProductArg::BusinessCentral => Self::BusinessCentral,
            ProductArg::FinanceOperations => Self::FinanceOperations,
            ProductArg::Dataverse => Self::Dataverse,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    if let Err(error) = s2s_proxy::harden_process() {
        tracing::warn!(error = %error, "Could not disable core dumps; secrets could end up in one.");
    }
    match execute(cli.command) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            match error.downcast_ref::<init::InitError>() {
                Some(init::InitError::Usage(_)) => ExitCode::from(2),
                _ => ExitCode::from(1),
            }
        }
    }
}

fn execute(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(args) => {
            let config = load(&args.config)?;
            // This runtime does what happens once per process (token renewal, reloads,
            // the admin listener, the drain); the proxy serves on `server.workers`
            // threads of its own, each with a current-thread runtime.
            runtime()?.block_on(async {
                let proxy = Proxy::bind_with_path(config, &args.config).await?;
                proxy.run_until(s2s_proxy::shutdown_signal()).await?;
                anyhow::Ok(ExitCode::SUCCESS)
            })
        }
        Command::Check(args) => {
            let config = Config::load(&args.config)?;
            // Printed, not logged: `check` shows it whatever RUST_LOG says.
            if let Some(warning) = s2s_proxy::config::inline_secret_warning(&args.config) {
                eprintln!("warning: {warning}");
            }
            println!("{}: configuration OK\n", args.config.display());
            print!("{}", report::route_table(&config));
            Ok(ExitCode::SUCCESS)
        }
        Command::Token { route, raw, config } => {
            let config = load(&config.config)?;
            runtime()?.block_on(async {
                let (text, ok) = report::token(&config, &route, raw).await;
                if ok {
                    print!("{text}");
                } else {
                    eprint!("{text}");
                }
                anyhow::Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            })
        }
        Command::Doctor(args) => {
            let config = load(&args.config)?;
            runtime()?.block_on(async {
                let (text, ok) = s2s_proxy::doctor::run(&config).await;
                print!("{text}");
                anyhow::Ok(if ok {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                })
            })
        }
        Command::HashSecret => {
            let mut input = String::new();
            std::io::stdin()
                .read_to_string(&mut input)
                .context("reading the secret from stdin")?;
            let secret = Secret::new(input.trim_end_matches(['\n', '\r']));
            if secret.expose().is_empty() {
                bail!("the secret on stdin is empty");
            }
            println!("{}", secret.digest().to_config_form());
            Ok(ExitCode::SUCCESS)
        }
        Command::Dev { listen } => {
            runtime()?.block_on(s2s_proxy::dev::run(listen))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Init(args) => init(args),
        Command::Schema => {
            print!("{}", s2s_proxy::config::json_schema());
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck { url } => {
            s2s_proxy::healthcheck(&url, Duration::from_secs(3))
                .with_context(|| format!("health check of {url}"))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `init`: the dialogue (or the flags and the secret on stdin), the files, the summary,
/// and in interactive mode the offer to run `doctor` on what was written.
fn init(args: InitArgs) -> anyhow::Result<ExitCode> {
    let flags = init::Flags {
        product: args.product.map(Into::into),
        tenant_id: args.tenant_id,
        client_id: args.client_id,
        environment: args.environment,
        url: args.url,
        client_name: args.client_name,
    };
    let dir = args.dir.unwrap_or_else(|| PathBuf::from("."));
    if args.non_interactive {
        flags.validate()?;
        init::preflight(&dir, args.force)?;
        let secret = init::read_secret(std::io::stdin().lock())?;
        let (answers, warnings) = flags.into_answers(secret)?;
        for warning in warnings {
            eprintln!("warning: {warning}");
        }
        let written = init::write(&answers, &dir, args.force)?;
        print!("{}", init::summary(&written));
        return Ok(ExitCode::SUCCESS);
    }
    let given = flags.validate()?;
    init::preflight(&dir, args.force)?;
    let mut prompter = init::prompt::Prompter::stdio();
    prompter.say(&format!(
        "s2s-proxy init: writes {} and {} for one Dynamics 365 route.\n\n",
        dir.join(init::CONFIG_FILE).display(),
        dir.join(init::ENV_FILE).display()
    ))?;
    let answers = prompter.answers(given)?;
    let written = init::write(&answers, &dir, args.force)?;
    prompter.say(&init::summary(&written))?;
    prompter.say("\n")?;
    if !prompter.confirm("Run `s2s-proxy doctor` on it now?", true)? {
        return Ok(ExitCode::SUCCESS);
    }
    let config = init::load_with_env_file(&written.config, &written.env)?;
    let (text, ok) = runtime()?.block_on(s2s_proxy::doctor::run(&config));
    prompter.say(&text)?;
    if !ok {
        prompter.say(
            "\ndoctor found a problem (often the grant step above is still to do); fix it and \
             run `s2s-proxy doctor` again.\n",
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn load(path: &Path) -> anyhow::Result<Config> {
    let config = Config::load(path)?;
    if let Some(warning) = s2s_proxy::config::inline_secret_warning(path) {
        tracing::warn!("{warning}");
    }
    Ok(config)
}

/// The command's own runtime: a current-thread one. `run` serves on worker threads of its
/// own (`server.workers`); everything else here waits on one thing at a time.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // Colours only for a terminal that wants them (https://no-color.org).
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
