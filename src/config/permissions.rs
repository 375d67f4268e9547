//! A check on the configuration file's permissions.
//!
//! Secrets belong in `${VAR}` or `${file:PATH}`; a secret written inline into a file that
//! every local user can read is worth a warning (the proxy still starts: the file may sit
//! in a container where no other user exists). The secrets are found in the parsed
//! document, not in its lines, so block style, flow style (`{ client_secret: "x" }`) and
//! quoting all count alike. `run` logs the warning; `check` prints it.

use std::path::Path;

use super::raw::{self, RawConfig, RawCredential, StringOr};

/// A warning when `path` is readable by other users and holds a secret written inline.
/// The warning names the fields, never their values.
pub fn inline_secret_warning(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o004 == 0 {
            return None;
        }
        let text = super::read_bounded(path).ok()?;
        let fields = inline_secrets(&raw::parse(&text).ok()?);
        if fields.is_empty() {
            return None;
        }
        Some(format!(
            "{}: holds an inline secret ({}) and is readable by other users (mode {:o}); \
             use ${{VAR}} or ${{file:PATH}}, or chmod o-r",
            path.display(),
            fields.join(", "),
            mode & 0o777
        ))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

/// The YAML paths of secrets written as literal text rather than wholly one `${…}`
/// reference. Client passwords and API keys are not among them: the loader refuses those
/// unless they are a reference or a `sha256:` digest.
pub(super) fn inline_secrets(raw: &RawConfig) -> Vec<String> {
    let mut fields = Vec::new();
    let mut check = |path: String, value: Option<&String>| {
        if value.is_some_and(|v| is_inline(v)) {
            fields.push(path);
        }
    };
    let credentials = raw.credentials.as_ref().map_or(&[][..], |c| &c.0[..]);
    for (name, credential) in credentials {
        let at = format!("credentials.{name}");
        match credential {
            RawCredential::ClientSecret(c) => {
                check(format!("{at}.client_secret"), c.client_secret.as_ref());
                for (index, entry) in c.client_secrets.iter().flatten().enumerate() {
                    match entry {
                        StringOr::String(value) => {
                            check(format!("{at}.client_secrets[{index}]"), Some(value));
                        }
                        StringOr::Map(entry) => check(
                            format!("{at}.client_secrets[{index}].value"),
                            entry.value.as_ref(),
                        ),
                    }
                }
            }
            RawCredential::ClientCertificate(c) => {
                check(
                    format!("{at}.certificate_password"),
                    c.certificate_password.as_ref(),
                );
                for (index, entry) in c.certificate_files.iter().flatten().enumerate() {
                    if let StringOr::Map(entry) = entry {
                        check(
                            format!("{at}.certificate_files[{index}].password"),
                            entry.password.as_ref(),
                        );
                    }
                }
            }
            RawCredential::ManagedIdentity(_) | RawCredential::WorkloadIdentity(_) => {}
        }
    }
    fields
}

/// Anything but one whole `${…}` reference holds secret text itself.
fn is_inline(value: &str) -> bool {
    let value = value.trim();
    let whole_reference = value.starts_with("${")
        && !value.starts_with("$${")
        && value.ends_with('}')
        && value.find('}') == Some(value.len() - 1);
    !value.is_empty() && !whole_reference
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn warns_only_for_world_readable_inline_secrets() {
        let dir = crate::test_support::TempDir::new("perm");
        let write = |name: &str, text: &str, mode: u32| {
            let path = dir.write(name, text);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        };
        let inline = "credentials:\n  bc:\n    type: client_secret\n    client_secret: abc~def\n";
        let referenced =
            "credentials:\n  bc:\n    type: client_secret\n    client_secret: ${BC_SECRET}\n";
        let warning = inline_secret_warning(&write("a.yaml", inline, 0o644)).unwrap();
        assert!(
            warning.contains("mode 644")
                && warning.contains("credentials.bc.client_secret")
                && !warning.contains("abc~def"),
            "{warning}"
        );
        assert!(inline_secret_warning(&write("b.yaml", inline, 0o640)).is_none());
        assert!(inline_secret_warning(&write("c.yaml", referenced, 0o644)).is_none());
    }

    #[test]
    fn finds_inline_secrets_however_the_yaml_is_written() {
        let found = |yaml: &str| inline_secrets(&raw::parse(yaml).unwrap());
        assert_eq!(
            found("credentials: { bc: { type: client_secret, client_secret: \"x\" } }\n"),
            ["credentials.bc.client_secret"]
        );
        assert_eq!(
            found(
                "credentials:\n  bc:\n    type: client_secret\n    client_secrets:\n      \
                 - ${A}\n      - { value: 'b', expires: 2030-01-01 }\n      - \"c${B}\"\n"
            ),
            [
                "credentials.bc.client_secrets[1].value",
                "credentials.bc.client_secrets[2]"
            ]
        );
        assert_eq!(
            found(
                "credentials:\n  f:\n    type: client_certificate\n    \
                 certificate_files: [a.pem, { file: b.pfx, password: hunter2 }]\n  \
                 g: {type: client_certificate, certificate_password: '${file:p}'}\n"
            ),
            ["credentials.f.certificate_files[1].password"]
        );
        assert!(
            found("credentials:\n  bc: {type: client_secret, client_secret: '${S}'}\n").is_empty()
        );
    }
}
