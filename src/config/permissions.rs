//! A start-up check on the configuration file's permissions.
//!
//! Secrets belong in `${VAR}` or `${file:PATH}`; a client secret written inline into a
//! file that every local user can read is worth a warning (the proxy still starts: the
//! file may sit in a container where no other user exists).

use std::path::Path;

/// A warning when `path` is readable by other users and holds an inline client secret.
pub fn inline_secret_warning(path: &Path) -> Option<String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path).ok()?.permissions().mode();
        if mode & 0o004 == 0 {
            return None;
        }
        let text = std::fs::read_to_string(path).ok()?;
        let inline = text.lines().any(|line| {
            let line = line.trim_start().trim_start_matches("- ");
            let Some(value) = line
                .strip_prefix("client_secret:")
                .or_else(|| line.strip_prefix("client_secrets:"))
            else {
                return false;
            };
            let value = value.trim().trim_matches(['"', '\'', '[', ' ']);
            !value.is_empty() && !value.starts_with("${")
        });
        inline.then(|| {
            format!(
                "{}: holds an inline client_secret and is readable by other users (mode {:o}); \
                 use ${{VAR}} or ${{file:PATH}}, or chmod o-r",
                path.display(),
                mode & 0o777
            )
        })
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
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
        let inline = "credentials:\n  bc:\n    client_secret: abc~def\n";
        let referenced = "credentials:\n  bc:\n    client_secret: ${BC_SECRET}\n";
        let warning = inline_secret_warning(&write("a.yaml", inline, 0o644)).unwrap();
        assert!(
            warning.contains("mode 644") && !warning.contains("abc~def"),
            "{warning}"
        );
        assert!(inline_secret_warning(&write("b.yaml", inline, 0o640)).is_none());
        assert!(inline_secret_warning(&write("c.yaml", referenced, 0o644)).is_none());
    }
}
