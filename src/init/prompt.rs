//! The interactive dialogue of `s2s-proxy init`: questions with defaults, each answer
//! validated as typed (a bad one is explained and asked again), and the client secret read
//! without echo.
//!
//! The dialogue runs on any `BufRead` + `Write` pair so tests can script it; on a terminal,
//! hidden input turns the terminal's `ECHO` flag off for one line (`ECHONL` stays on, so
//! the Enter key still moves to a new line), as getpass(3) does, through POSIX termios
//! (tcgetattr/tcsetattr) and restores it afterwards. Without a terminal (answers piped
//! in) the secret is read as a plain line: nothing echoes it then.

use std::io::{self, BufRead, Write};
use std::os::fd::{AsFd as _, BorrowedFd};

use super::{
    Answers, DEFAULT_CLIENT_NAME, DEFAULT_ENVIRONMENT, Given, InitError, Product,
    SECRET_ID_WARNING, Target, check_secret, parse_client_name, parse_environment, parse_guid,
    parse_service_url, parse_tenant, secret_looks_like_id,
};
use crate::secret::Secret;

/// Questions on `output`, answers from `input`.
pub struct Prompter<R, W> {
    input: R,
    output: W,
    /// Standard input is a terminal: turn its echo off for hidden input.
    terminal: bool,
}

impl<R, W> std::fmt::Debug for Prompter<R, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prompter")
            .field("terminal", &self.terminal)
            .finish_non_exhaustive()
    }
}

impl Prompter<io::StdinLock<'static>, io::Stdout> {
    /// Standard input and output; hidden input when standard input is a terminal.
    pub fn stdio() -> Self {
        let stdin = io::stdin();
        let terminal = rustix::termios::isatty(&stdin);
        Self {
            input: stdin.lock(),
            output: io::stdout(),
            terminal,
        }
    }
}

impl<R: BufRead, W: Write> Prompter<R, W> {
    /// A scripted dialogue (no terminal: nothing to hide).
    pub fn new(input: R, output: W) -> Self {
        Self {
            input,
            output,
            terminal: false,
        }
    }

    pub fn into_output(self) -> W {
        self.output
    }

    /// Writes `text` as is.
    pub fn say(&mut self, text: &str) -> Result<(), InitError> {
        self.output
            .write_all(text.as_bytes())
            .and_then(|()| self.output.flush())
            .map_err(|source| InitError::Io {
                what: "writing to the terminal".to_owned(),
                source,
            })
    }

    /// One answer line, without its line ending. `what` names the question for EOF errors.
    fn read_line(&mut self, what: &'static str) -> Result<zeroize::Zeroizing<String>, InitError> {
        let mut line = zeroize::Zeroizing::new(String::new());
        let read = self
            .input
            .read_line(&mut line)
            .map_err(|source| InitError::Io {
                what: "reading an answer".to_owned(),
                source,
            })?;
        if read == 0 {
            return Err(InitError::InputEnded(what));
        }
        let trimmed = line.trim_end_matches(['\n', '\r']).len();
        line.truncate(trimmed);
        Ok(line)
    }

    /// Asks until `parse` accepts the answer; an empty answer takes `default`.
    fn ask<T>(
        &mut self,
        what: &'static str,
        question: &str,
        default: Option<&str>,
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Result<T, InitError> {
        loop {
            match default {
                Some(default) => self.say(&format!("{question} [{default}]: "))?,
                None => self.say(&format!("{question}: "))?,
            }
            let line = self.read_line(what)?;
            let answer = match (line.trim(), default) {
                ("", Some(default)) => default,
                ("", None) => {
                    self.say("  An answer is needed.\n")?;
                    continue;
                }
                (answer, _) => answer,
            };
            match parse(answer) {
                Ok(value) => return Ok(value),
                Err(message) => self.say(&format!("  {message}. Try again.\n"))?,
            }
        }
    }

    /// A yes/no question; an empty answer takes `default`, the end of input "no".
    pub fn confirm(&mut self, question: &str, default: bool) -> Result<bool, InitError> {
        let hint = if default { "Y/n" } else { "y/N" };
        loop {
            self.say(&format!("{question} [{hint}]: "))?;
            let line = match self.read_line("a yes/no question") {
                Ok(line) => line,
                Err(InitError::InputEnded(_)) => {
                    self.say("\n")?;
                    return Ok(false);
                }
                Err(error) => return Err(error),
            };
            match line.trim().to_ascii_lowercase().as_str() {
                "" => return Ok(default),
                "y" | "yes" => return Ok(true),
                "n" | "no" => return Ok(false),
                _ => self.say("  Answer y or n.\n")?,
            }
        }
    }

    /// Shows `prompt` and reads one line without echo when on a terminal. Echo goes off
    /// before the prompt appears, so an answer typed at the prompt is never shown.
    fn hidden_line(
        &mut self,
        prompt: &str,
        what: &'static str,
    ) -> Result<zeroize::Zeroizing<String>, InitError> {
        if !self.terminal {
            self.say(prompt)?;
            return self.read_line(what);
        }
        let stdin = io::stdin();
        let guard = EchoOff::new(stdin.as_fd()).map_err(|source| InitError::Io {
            what: "turning terminal echo off".to_owned(),
            source,
        })?;
        self.say(prompt)?;
        let line = self.read_line(what);
        drop(guard);
        line
    }

    /// Asks for the client secret until it is usable; a GUID is questioned (AADSTS7000215).
    fn secret(&mut self) -> Result<Secret, InitError> {
        loop {
            let line = self.hidden_line(
                "Client secret Value (typing is hidden): ",
                "the client secret",
            )?;
            let secret = Secret::new(line.as_str());
            if let Err(message) = check_secret(secret.expose()) {
                self.say(&format!("  The secret is {message}. Try again.\n"))?;
                continue;
            }
            if secret_looks_like_id(secret.expose()) {
                self.say(&format!("  Warning: {SECRET_ID_WARNING}\n"))?;
                let keep = self.confirm("  Use it anyway?", false)?;
                if !keep {
                    continue;
                }
            }
            return Ok(secret);
        }
    }

    /// The whole dialogue; flags already given skip their questions.
    pub fn answers(&mut self, given: Given) -> Result<Answers, InitError> {
        let product = match given.product {
            Some(product) => product,
            None => {
                self.say("Which product does the proxy front?\n")?;
                for (n, product) in Product::ALL.iter().enumerate() {
                    self.say(&format!("  {}) {}\n", n + 1, product.label()))?;
                }
                self.ask("the product", "Product", Some("1"), Product::parse)?
            }
        };
        let tenant_id = match given.tenant_id {
            Some(tenant) => tenant,
            None => self.ask("the tenant ID", "Directory (tenant) ID", None, parse_tenant)?,
        };
        let client_id = match given.client_id {
            Some(client) => client,
            None => self.ask(
                "the client ID",
                "Application (client) ID of the app registration",
                None,
                parse_guid,
            )?,
        };
        let client_secret = self.secret()?;
        let target = match given.target {
            Some(target) => target,
            None => match product {
                Product::BusinessCentral => Target::Environment(self.ask(
                    "the environment",
                    "Business Central environment",
                    Some(DEFAULT_ENVIRONMENT),
                    parse_environment,
                )?),
                Product::FinanceOperations => Target::Url(self.ask(
                    "the URL",
                    "Finance & Operations URL (e.g. https://contoso.operations.dynamics.com)",
                    None,
                    |text| parse_service_url(product, text),
                )?),
                Product::Dataverse => Target::Url(self.ask(
                    "the URL",
                    "Dataverse environment URL (e.g. https://contoso.crm4.dynamics.com)",
                    None,
                    |text| parse_service_url(product, text),
                )?),
            },
        };
        let client_name = match given.client_name {
            Some(name) => name,
            None => self.ask(
                "the client name",
                "Name of the calling client (its Basic user name)",
                Some(DEFAULT_CLIENT_NAME),
                parse_client_name,
            )?,
        };
        Ok(Answers {
            product,
            tenant_id,
            client_id,
            client_secret,
            target,
            client_name,
        })
    }
}

/// Terminal echo off until dropped.
struct EchoOff<'a> {
    fd: BorrowedFd<'a>,
    saved: rustix::termios::Termios,
}

impl<'a> EchoOff<'a> {
    fn new(fd: BorrowedFd<'a>) -> io::Result<Self> {
        use rustix::termios::{LocalModes, OptionalActions, tcgetattr, tcsetattr};
        let saved = tcgetattr(fd)?;
        let mut quiet = saved.clone();
        quiet.local_modes.remove(LocalModes::ECHO);
        quiet.local_modes.insert(LocalModes::ECHONL);
        // TCSANOW: keep what was typed ahead (TCSAFLUSH would drop it).
        tcsetattr(fd, OptionalActions::Now, &quiet)?;
        Ok(Self { fd, saved })
    }
}

impl Drop for EchoOff<'_> {
    fn drop(&mut self) {
        let _ =
            rustix::termios::tcsetattr(self.fd, rustix::termios::OptionalActions::Now, &self.saved);
    }
}
