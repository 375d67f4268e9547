//! `${…}` expansion in configuration strings.
//!
//! Rules, applied to every string value of `proxy.yaml`:
//! - `${NAME}` is the variable `NAME` (`[A-Za-z_][A-Za-z0-9_]*`); unset is a problem.
//! - `${file:PATH}` is the file's contents with trailing `\n` / `\r\n` removed; a relative
//!   `PATH` resolves against the configuration file's directory.
//! - `${secret:STORE/NAME}` is a secret from a secret store, allowed only where the caller
//!   passes a resolver (secret fields); elsewhere it is a problem.
//! - `$${` is a literal `${`. Any other `$` is literal (`pa$$word` stays as written).
//! - An unterminated `${`, an empty `${}` or an invalid name is a problem.
//!
//! Expansion does not recurse: a variable's value is used as is. The caller learns whether
//! the string was wholly one reference, which is how a secret "comes from" the environment
//! or a file rather than being written into the YAML.

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

/// Where `${NAME}` values come from.
#[derive(Clone)]
pub struct Variables(Option<HashMap<String, String>>);

impl std::fmt::Debug for Variables {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values may be secrets; names are enough to debug with.
        match &self.0 {
            None => f.write_str("Variables(process environment)"),
            Some(map) => f.debug_set().entries(map.keys()).finish(),
        }
    }
}

impl Variables {
    /// The process environment.
    pub fn process() -> Self {
        Self(None)
    }

    /// A fixed set (tests, the `dev` demo); nothing is read from the environment.
    pub fn map(map: HashMap<String, String>) -> Self {
        Self(Some(map))
    }

    pub fn get(&self, name: &str) -> Option<String> {
        match &self.0 {
            Some(map) => map.get(name).cloned(),
            None => std::env::var(name).ok(),
        }
    }
}

/// Largest file `${file:…}` reads: secrets and ids are small, and `/dev/zero` must not hang
/// the loader.
const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// The result of expanding one string.
#[derive(Debug)]
pub(super) struct Expanded {
    pub(super) value: String,
    /// The string was exactly one `${NAME}` or `${file:PATH}` and nothing else.
    pub(super) whole_reference: bool,
    /// The string contained at least one reference.
    pub(super) has_reference: bool,
}

/// Expands `text`. On failure, returns one message per bad reference; messages name the
/// variable or file, never a value.
pub(super) fn expand(
    text: &str,
    variables: &Variables,
    base_dir: &Path,
) -> Result<Expanded, Vec<String>> {
    expand_with(text, variables, base_dir, None)
}

/// Resolves the `STORE/NAME` of a `${secret:STORE/NAME}` to its value.
pub(super) type SecretResolver<'a> = &'a mut dyn FnMut(&str) -> Result<String, String>;

/// [`expand`], with `secrets` resolving `${secret:…}` (a secret field); `None` makes such a
/// reference a problem.
pub(super) fn expand_with(
    text: &str,
    variables: &Variables,
    base_dir: &Path,
    mut secrets: Option<SecretResolver<'_>>,
) -> Result<Expanded, Vec<String>> {
    // Wholly one reference, the usual form of a secret: hand the value over without a copy.
    if let Some(inner) = text.strip_prefix("${").and_then(|t| t.strip_suffix('}'))
        && !inner.contains('}')
    {
        return match resolve(inner, variables, base_dir, &mut secrets) {
            Ok(value) => Ok(Expanded {
                value,
                whole_reference: true,
                has_reference: true,
            }),
            Err(problem) => Err(vec![problem]),
        };
    }
    let mut value = String::with_capacity(text.len());
    let mut problems = Vec::new();
    let mut references = 0;
    let mut literal = false;
    let mut rest = text;

    while let Some(at) = rest.find('$') {
        let (before, from_dollar) = rest.split_at(at);
        value.push_str(before);
        literal |= !before.is_empty();
        if let Some(after) = from_dollar.strip_prefix("$${") {
            value.push_str("${");
            literal = true;
            rest = after;
        } else if let Some(after) = from_dollar.strip_prefix("${") {
            let Some(end) = after.find('}') else {
                problems
                    .push("`${` without a closing `}`; write `$${` for a literal `${`".to_owned());
                rest = "";
                break;
            };
            references += 1;
            match resolve(&after[..end], variables, base_dir, &mut secrets) {
                Ok(resolved) => value.push_str(&resolved),
                Err(problem) => problems.push(problem),
            }
            rest = &after[end + 1..];
        } else {
            value.push('$');
            literal = true;
            rest = &from_dollar[1..];
        }
    }
    value.push_str(rest);
    literal |= !rest.is_empty();

    if problems.is_empty() {
        Ok(Expanded {
            value,
            whole_reference: references == 1 && !literal,
            has_reference: references > 0,
        })
    } else {
        Err(problems)
    }
}

/// Resolves the inside of one `${…}`.
fn resolve(
    reference: &str,
    variables: &Variables,
    base_dir: &Path,
    secrets: &mut Option<SecretResolver<'_>>,
) -> Result<String, String> {
    if let Some(path) = reference.strip_prefix("file:") {
        return read_file(path, base_dir);
    }
    if let Some(name) = reference.strip_prefix("secret:") {
        return match secrets {
            Some(resolve) => resolve(name),
            None => Err(format!(
                "`${{secret:{name}}}` may stand only where a secret does (client secrets, \
                 certificate passwords, Basic passwords, API keys)"
            )),
        };
    }
    if !is_variable_name(reference) {
        return Err(format!(
            "`${{{reference}}}` is not a valid reference; write `${{NAME}}` (letters, digits \
             and `_`), `${{file:PATH}}` or `${{secret:STORE/NAME}}`"
        ));
    }
    variables.get(reference).ok_or_else(|| {
        format!("environment variable `{reference}` is not set; set it or change this value")
    })
}

fn is_variable_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Reads a `${file:PATH}` file again (secret rotation), with the same size limit and
/// trimming as at load time.
pub(super) fn reread_file(path: &Path) -> Result<String, String> {
    read_file(&path.to_string_lossy(), Path::new(""))
}

fn read_file(path: &str, base_dir: &Path) -> Result<String, String> {
    if path.is_empty() {
        return Err("`${file:}` names no file; write `${file:PATH}`".to_owned());
    }
    let full = base_dir.join(path);
    let shown = full.display();
    let file =
        std::fs::File::open(&full).map_err(|error| format!("cannot read {shown}: {error}"))?;
    let mut contents = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut contents)
        .map_err(|error| format!("cannot read {shown}: {error}"))?;
    if contents.len() as u64 > MAX_FILE_BYTES {
        return Err(format!(
            "cannot read {shown}: larger than {} KiB",
            MAX_FILE_BYTES / 1024
        ));
    }
    // Trailing line endings (LF, CRLF), as editors and `echo` leave them.
    while contents.ends_with('\n') || contents.ends_with('\r') {
        contents.pop();
    }
    Ok(contents)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Variables {
        Variables::map(
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
        )
    }

    fn ok(text: &str, v: &Variables) -> Expanded {
        expand(text, v, Path::new(".")).expect("expands")
    }

    #[test]
    fn plain_text_is_unchanged() {
        let e = ok("https://example.com/a", &vars(&[]));
        assert_eq!(e.value, "https://example.com/a");
        assert!(!e.whole_reference && !e.has_reference);
    }

    #[test]
    fn variables_expand_and_whole_reference_is_detected() {
        let v = vars(&[("A", "one"), ("B_2", "two")]);
        let e = ok("${A}", &v);
        assert_eq!(e.value, "one");
        assert!(e.whole_reference);
        let e = ok("x/${A}/${B_2}", &v);
        assert_eq!(e.value, "x/one/two");
        assert!(!e.whole_reference && e.has_reference);
        let e = ok("${A}${B_2}", &v);
        assert_eq!(e.value, "onetwo");
        assert!(!e.whole_reference);
    }

    #[test]
    fn dollar_rules() {
        let v = vars(&[("A", "one")]);
        let e = ok("$${A}", &v);
        assert_eq!(e.value, "${A}");
        assert!(!e.has_reference);
        assert_eq!(ok("pa$$word$", &v).value, "pa$$word$");
        assert_eq!(ok("$A", &v).value, "$A");
        // Left to right: a lone `$`, then the escape.
        let e = ok("$$${A}", &v);
        assert_eq!(e.value, "$${A}");
        assert!(!e.has_reference);
    }

    #[test]
    fn errors_name_the_variable_and_never_the_value() {
        let v = vars(&[("SET", "secret-value")]);
        let problems = expand("${UNSET}-${SET}-${ALSO}", &v, Path::new(".")).unwrap_err();
        assert_eq!(
            problems,
            [
                "environment variable `UNSET` is not set; set it or change this value",
                "environment variable `ALSO` is not set; set it or change this value",
            ]
        );
        let problems = expand("abc${SET", &v, Path::new(".")).unwrap_err();
        assert_eq!(
            problems,
            ["`${` without a closing `}`; write `$${` for a literal `${`"]
        );
        let problems = expand("${}${1X}${a-b}", &v, Path::new(".")).unwrap_err();
        assert_eq!(problems.len(), 3);
        assert!(problems[1].contains("`${1X}` is not a valid reference"));
    }

    #[test]
    fn secret_references_need_a_resolver() {
        let v = vars(&[]);
        let problems = expand("${secret:kv/a}", &v, Path::new(".")).unwrap_err();
        assert!(
            problems[0].starts_with("`${secret:kv/a}` may stand only where a secret does"),
            "{problems:?}"
        );
        let mut seen = Vec::new();
        let mut resolve = |r: &str| {
            seen.push(r.to_owned());
            Ok("VALUE".to_owned())
        };
        let e = expand_with("${secret:kv/a}", &v, Path::new("."), Some(&mut resolve)).unwrap();
        assert_eq!(e.value, "VALUE");
        assert!(e.whole_reference);
        let e = expand_with("x${secret:kv/b}", &v, Path::new("."), Some(&mut resolve)).unwrap();
        assert_eq!(e.value, "xVALUE");
        assert!(!e.whole_reference);
        assert_eq!(seen, ["kv/a", "kv/b"]);
    }

    #[test]
    fn empty_variable_is_a_value() {
        let e = ok("${E}", &vars(&[("E", "")]));
        assert_eq!(e.value, "");
        assert!(e.whole_reference);
    }

    #[test]
    fn files_are_read_relative_to_base_dir_and_trimmed() {
        let temp = crate::test_support::TempDir::new("expand");
        let dir = temp.path();
        temp.write("lf", "value\n");
        temp.write("crlf", "value\r\n");
        temp.write("inner", "a\nb\n\n");
        let v = vars(&[]);
        for name in ["lf", "crlf"] {
            let e = expand(&format!("${{file:{name}}}"), &v, dir).unwrap();
            assert_eq!(e.value, "value");
            assert!(e.whole_reference);
        }
        assert_eq!(expand("${file:inner}", &v, dir).unwrap().value, "a\nb");
        let absolute = dir.join("lf");
        let e = expand(
            &format!("${{file:{}}}", absolute.display()),
            &v,
            Path::new("/nonexistent"),
        )
        .unwrap();
        assert_eq!(e.value, "value");
        let problems = expand("${file:missing}", &v, dir).unwrap_err();
        assert!(
            problems[0].starts_with(&format!("cannot read {}: ", dir.join("missing").display()))
        );
    }
}
