//! The documentation holds together: every relative link and `#anchor` in README.md,
//! SECURITY.md and `docs/*.md` resolves (anchors as GitHub derives them from headings), the
//! README keeps its two commands, and nothing in the repository cites documents that are
//! not in it.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// README.md, SECURITY.md and every `docs/*.md`.
fn documents() -> Vec<PathBuf> {
    let mut files = vec![root().join("README.md"), root().join("SECURITY.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root().join("docs"))
        .expect("docs/ exists")
        .map(|entry| entry.expect("readable docs/ entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// The lines of a markdown text outside fenced code blocks.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    let mut lines = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            lines.push(line);
        }
    }
    lines
}

/// GitHub's anchor for a heading: lower case, punctuation dropped (but `-` and `_`), each
/// space a `-`; a repeated heading gets `-1`, `-2`, ….
fn anchors(text: &str) -> HashSet<String> {
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut anchors = HashSet::new();
    for line in prose(text) {
        let Some(title) = line
            .strip_prefix('#')
            .map(|rest| rest.trim_start_matches('#'))
            .and_then(|rest| rest.strip_prefix(' '))
        else {
            continue;
        };
        let slug: String = title
            .trim()
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let count = seen.entry(slug.clone()).or_insert(0);
        let anchor = if *count == 0 {
            slug.clone()
        } else {
            format!("{slug}-{count}")
        };
        *count += 1;
        anchors.insert(anchor);
    }
    anchors
}

/// The targets of inline links `[text](target)` outside code blocks and code spans.
fn link_targets(text: &str) -> Vec<String> {
    let mut targets = Vec::new();
    for line in prose(text) {
        // Drop code spans, so `[a](b)` shown as code is not a link.
        let mut plain = String::new();
        for (i, part) in line.split('`').enumerate() {
            if i % 2 == 0 {
                plain.push_str(part);
            }
        }
        let mut rest = plain.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let end = after.find(')').unwrap_or(after.len());
            targets.push(after[..end].trim().to_owned());
            rest = &after[end..];
        }
    }
    targets
}

#[test]
fn every_relative_link_and_anchor_in_the_docs_resolves() {
    let mut broken = Vec::new();
    for file in documents() {
        let text = std::fs::read_to_string(&file).expect("readable document");
        let dir = file.parent().expect("a file has a directory");
        for target in link_targets(&text) {
            if target.contains("://") || target.starts_with("mailto:") || target.is_empty() {
                continue;
            }
            let (path, anchor) = match target.split_once('#') {
                Some((path, anchor)) => (path, Some(anchor)),
                None => (target.as_str(), None),
            };
            let resolved = if path.is_empty() {
                file.clone()
            } else {
                dir.join(path)
            };
            let shown = format!(
                "{}: ({target})",
                file.strip_prefix(root()).unwrap_or(&file).display()
            );
            if !resolved.exists() {
                broken.push(format!("{shown}: no such file"));
                continue;
            }
            if let Some(anchor) = anchor {
                let is_markdown = resolved.extension().is_some_and(|ext| ext == "md");
                let text = std::fs::read_to_string(&resolved).unwrap_or_default();
                if !is_markdown || !anchors(&text).contains(anchor) {
                    broken.push(format!("{shown}: no heading for #{anchor}"));
                }
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}

#[test]
fn the_anchor_rule_matches_githubs_for_the_headings_the_docs_use() {
    let text = "# s2s-proxy\n## Set up Finance & Operations\n### Diagnostics: `doctor`\n\
                ## Status / roadmap\n```sh\n# not a heading\n```\n### `$batch` requests\n\
                ## Values\n## Values\n";
    let found = anchors(text);
    for anchor in [
        "s2s-proxy",
        "set-up-finance--operations",
        "diagnostics-doctor",
        "status--roadmap",
        "batch-requests",
        "values",
        "values-1",
    ] {
        assert!(found.contains(anchor), "{anchor} not in {found:?}");
    }
    assert!(!found.contains("not-a-heading"));
    assert_eq!(
        link_targets("see [a](b.md#c) and `[x](y)` [d](#e)"),
        ["b.md#c", "#e"]
    );
}

#[test]
fn the_readme_shows_the_two_commands_and_links_the_reference() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let commands: Vec<&str> = readme.lines().map(str::trim).collect();
    assert!(commands.contains(&"cargo run --release -- dev"), "README");
    assert!(commands.contains(&"cargo test"), "README");
    for doc in [
        "docs/configuration.md",
        "docs/credentials.md",
        "docs/request-handling.md",
        "docs/dynamics.md",
        "docs/operations.md",
        "docs/troubleshooting.md",
        "docs/architecture.md",
        "SECURITY.md",
    ] {
        assert!(readme.contains(&format!("]({doc})")), "README links {doc}");
    }
}

/// Text files the repository ships: sources, tests, docs, deployment and CI files.
fn shipped_text_files() -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut pending: Vec<PathBuf> = [
        "src",
        "tests",
        "bench",
        "deploy",
        "fuzz",
        "docs",
        ".ci",
        "README.md",
        "SECURITY.md",
        "Dockerfile",
        "Cargo.toml",
        "proxy.yaml",
    ]
    .iter()
    .map(|name| root().join(name))
    .collect();
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            if path.file_name().is_some_and(|name| name == "target") {
                continue;
            }
            for entry in std::fs::read_dir(&path).expect("readable directory") {
                pending.push(entry.expect("readable entry").path());
            }
        } else if path.is_file() {
            files.push(path);
        }
    }
    files
}

#[test]
fn nothing_cites_documents_outside_the_repository() {
    // Built from pieces so that this file does not match itself.
    let outside = [
        ["DESIGN", ".md"].concat(),
        ["DYNAMICS", ".md"].concat(),
        ["SECURITY", "-CASES"].concat(),
    ];
    let mut citing = Vec::new();
    for file in shipped_text_files() {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue; // binary fixtures
        };
        for (number, line) in text.lines().enumerate() {
            if outside.iter().any(|name| line.contains(name.as_str())) {
                let shown = file.strip_prefix(root()).unwrap_or(&file).display();
                citing.push(format!("{shown}:{}: {}", number + 1, line.trim()));
            }
        }
    }
    assert!(
        citing.is_empty(),
        "cite README.md, SECURITY.md, docs/, an RFC or vendor documentation instead:\n{}",
        citing.join("\n")
    );
}
