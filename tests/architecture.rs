//! The shape of the house, checked on the sources: no import cycle between the crate's
//! top-level modules, and no non-test source file over 900 lines.
//!
//! The module graph is read from the text of `src/**/*.rs`: every `crate::…` path (in
//! `use` lines and in code, grouped `crate::{a, b::c}` included) in a file under
//! `src/NAME.rs` or `src/NAME/` is an edge from `NAME` to the path's first segment.
//! Comments (doc links included), `#[cfg(test)]` items and the files of `#[cfg(test)]`
//! modules are left out, and so is `lib.rs`, which wires every module together.
//! The module map and the rules behind it are in `docs/architecture.md`; the rule checked
//! here is only that dependencies between top-level modules run one way.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Longest non-test source file, in lines.
const MAX_LINES: usize = 900;

/// One source file as the check sees it.
struct Source {
    /// Path under `src/`, with `/` separators.
    path: String,
    text: String,
}

fn sources() -> Vec<Source> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    collect(&root, &mut files);
    files.sort();
    files
        .into_iter()
        .map(|file| Source {
            path: file
                .strip_prefix(&root)
                .expect("under src/")
                .to_string_lossy()
                .replace('\\', "/"),
            text: fs::read_to_string(&file).expect("readable source"),
        })
        .collect()
}

fn collect(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("readable directory") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            collect(&path, files);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            files.push(path);
        }
    }
}

/// The directory a file's child modules live in: `a/b.rs` → `a/b/`, `a/mod.rs` → `a/`.
fn child_dir(path: &str) -> String {
    match path.rsplit_once('/') {
        Some((dir, "mod.rs")) => format!("{dir}/"),
        None if path == "lib.rs" || path == "main.rs" => String::new(),
        _ => format!("{}/", path.trim_end_matches(".rs")),
    }
}

/// The file's code without comments and without `#[cfg(test)]` items (rustfmt layout: an
/// item ends with `;` on its last line or with `}` at its own indentation), plus the
/// paths of the files of `#[cfg(test)] mod name;` declarations.
fn non_test_code(source: &Source) -> (String, Vec<String>) {
    let mut code = String::new();
    let mut test_files = Vec::new();
    let mut lines = source.text.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        if trimmed != "#[cfg(test)]" {
            code.push_str(strip_comment(line));
            code.push('\n');
            continue;
        }
        let indent = &line[..line.len() - trimmed.len()];
        // Further attributes and doc comments, then the item.
        let mut item = lines.next().unwrap_or_default();
        while item.trim_start().starts_with("#[") || item.trim_start().starts_with("///") {
            item = lines.next().unwrap_or_default();
        }
        let item_trimmed = item.trim();
        if let Some(name) = item_trimmed
            .strip_prefix("mod ")
            .or_else(|| item_trimmed.strip_prefix("pub(crate) mod "))
            .or_else(|| item_trimmed.strip_prefix("pub mod "))
            .and_then(|rest| rest.strip_suffix(';'))
        {
            let dir = child_dir(&source.path);
            test_files.push(format!("{dir}{name}.rs"));
            test_files.push(format!("{dir}{name}/"));
            continue;
        }
        if item_trimmed.ends_with(';') {
            continue;
        }
        // A statement (`use`, `const`, …) ends with `;`; anything else ends with a line
        // at the item's own indentation that closes it: `}`, `};`, `);`.
        let statement = [
            "use ",
            "pub(crate) use ",
            "pub use ",
            "const ",
            "static ",
            "type ",
        ]
        .iter()
        .any(|start| item_trimmed.starts_with(start));
        for rest in lines.by_ref() {
            if statement && rest.trim_end().ends_with(';') {
                break;
            }
            if let Some(after) = rest.strip_prefix(indent)
                && (after.starts_with('}') || (after.starts_with(')') && after.ends_with(';')))
            {
                break;
            }
        }
    }
    (code, test_files)
}

/// `line` up to a `//` comment that is not inside a string literal (good enough for the
/// crate's own code: no `//` in raw strings next to a `crate::` path).
fn strip_comment(line: &str) -> &str {
    let mut in_string = false;
    let mut escaped = false;
    let bytes = line.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'\\' if in_string => {
                escaped = !escaped;
                continue;
            }
            b'"' if !escaped => in_string = !in_string,
            b'/' if !in_string && bytes.get(i + 1) == Some(&b'/') => return &line[..i],
            _ => {}
        }
        escaped = false;
    }
    line
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// The first segments of every `crate::` path in `code`, with the line each is on.
fn crate_paths(code: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (number, line) in code.lines().enumerate() {
        let bytes = line.as_bytes();
        let mut from = 0;
        while let Some(at) = line[from..].find("crate::").map(|i| i + from) {
            from = at + "crate::".len();
            // `$crate::` (macros) and `foo_crate::` are not this crate's paths.
            if at > 0 && (is_ident(bytes[at - 1]) || bytes[at - 1] == b'$') {
                continue;
            }
            let rest = &line[from..];
            if let Some(group) = rest.strip_prefix('{') {
                // `crate::{a, b::c, d::{e, f}}`: the top-level names of the group. A group
                // spanning lines is read up to the end of the `use`.
                let mut text = group.to_owned();
                if !text.contains('}') {
                    for more in code.lines().skip(number + 1) {
                        text.push_str(more);
                        if more.contains(';') {
                            break;
                        }
                    }
                }
                let mut depth = 0;
                let mut token = String::new();
                let mut expect_name = true;
                for c in text.chars() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => break,
                        '}' => depth -= 1,
                        ',' if depth == 0 => expect_name = true,
                        c if depth == 0 && expect_name && (c.is_alphanumeric() || c == '_') => {
                            token.push(c);
                        }
                        _ => {
                            if !token.is_empty() {
                                found.push((std::mem::take(&mut token), number + 1));
                                expect_name = false;
                            }
                        }
                    }
                }
                if !token.is_empty() {
                    found.push((token, number + 1));
                }
            } else {
                let name: String = rest
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.push((name, number + 1));
                }
            }
        }
    }
    found
}

/// The top-level module of a file under `src/`; `None` for the crate root.
fn top_level(path: &str) -> Option<&str> {
    match path.split_once('/') {
        Some((module, _)) => Some(module),
        None if path == "lib.rs" || path == "main.rs" => None,
        None => path.strip_suffix(".rs"),
    }
}

/// from → to → where (the first `file:line` that uses it).
type Graph = BTreeMap<String, BTreeMap<String, String>>;

fn module_graph(sources: &[Source]) -> Graph {
    let mut test_files = BTreeSet::new();
    let mut code = Vec::new();
    for source in sources {
        let (text, tests) = non_test_code(source);
        test_files.extend(tests);
        code.push((source.path.as_str(), text));
    }
    let modules: BTreeSet<&str> = sources.iter().filter_map(|s| top_level(&s.path)).collect();
    let mut graph = Graph::new();
    for (path, text) in code {
        let Some(from) = top_level(path) else {
            continue;
        };
        if is_test_file(path, &test_files) {
            continue;
        }
        graph.entry(from.to_owned()).or_default();
        for (to, line) in crate_paths(&text) {
            if to != from && modules.contains(to.as_str()) {
                graph
                    .entry(from.to_owned())
                    .or_default()
                    .entry(to)
                    .or_insert_with(|| format!("src/{path}:{line}"));
            }
        }
    }
    graph
}

/// Test-only files: `tests.rs` files, and those of `#[cfg(test)]` module declarations.
fn is_test_file(path: &str, test_files: &BTreeSet<String>) -> bool {
    path.ends_with("/tests.rs")
        || path.contains("/tests/")
        || test_files
            .iter()
            .any(|test| path == test || (test.ends_with('/') && path.starts_with(test.as_str())))
}

/// Every elementary cycle's canonical form (rotated to start at its least module), found
/// by a depth-first search from each module over the modules after it.
fn cycles(graph: &Graph) -> Vec<Vec<String>> {
    fn walk(
        graph: &Graph,
        start: &str,
        node: &str,
        path: &mut Vec<String>,
        found: &mut Vec<Vec<String>>,
    ) {
        for next in graph.get(node).into_iter().flat_map(BTreeMap::keys) {
            if next == start {
                found.push(path.clone());
            } else if next.as_str() > start && !path.contains(next) && found.len() < 100 {
                path.push(next.clone());
                walk(graph, start, next, path, found);
                path.pop();
            }
        }
    }
    let mut found = Vec::new();
    for start in graph.keys() {
        walk(graph, start, start, &mut vec![start.clone()], &mut found);
    }
    found
}

fn describe(cycle: &[String], graph: &Graph) -> String {
    let mut text = cycle.join(" → ");
    text.push_str(" → ");
    text.push_str(&cycle[0]);
    for (i, from) in cycle.iter().enumerate() {
        let to = &cycle[(i + 1) % cycle.len()];
        text.push_str(&format!("\n    {from} → {to}: {}", graph[from][to]));
    }
    text
}

#[test]
fn top_level_modules_have_no_import_cycle() {
    let sources = sources();
    let graph = module_graph(&sources);
    let found = cycles(&graph);
    assert!(
        found.is_empty(),
        "import cycles between top-level modules:\n{}",
        found
            .iter()
            .map(|cycle| describe(cycle, &graph))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn no_source_file_is_over_900_lines() {
    let sources = sources();
    let test_files: BTreeSet<String> = sources.iter().flat_map(|s| non_test_code(s).1).collect();
    let long: Vec<String> = sources
        .iter()
        .filter(|s| !is_test_file(&s.path, &test_files))
        .filter(|s| s.text.lines().count() > MAX_LINES)
        .map(|s| format!("src/{}: {} lines", s.path, s.text.lines().count()))
        .collect();
    assert!(
        long.is_empty(),
        "source files over {MAX_LINES} lines (move tests to a `tests.rs`, or split):\n{}",
        long.join("\n")
    );
}

/// The reader itself: grouped paths, comments and test items.
#[test]
fn the_reader_sees_paths_not_comments_or_tests() {
    let source = Source {
        path: "proxy/mod.rs".to_owned(),
        text: [
            "use crate::{batch::{self, Batch}, rewrite};",
            "use crate::token::Token; // crate::metrics in a comment",
            "/// [`crate::admin`] in a doc link",
            "fn f() { crate::routing::check(); }",
            "    #[cfg(test)]",
            "    pub(crate) fn new(",
            "        crate::dev::x;",
            "    ) {",
            "        crate::doctor::y();",
            "    }",
            "#[cfg(test)]",
            "mod checks;",
            "#[cfg(test)]",
            "mod tests {",
            "    use crate::dev;",
            "}",
            "#[cfg(test)]",
            "use crate::doctor;",
        ]
        .join("\n"),
    };
    let (code, test_files) = non_test_code(&source);
    let names: Vec<String> = crate_paths(&code).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["batch", "rewrite", "token", "routing"]);
    assert_eq!(test_files, ["proxy/checks.rs", "proxy/checks/"]);
    assert_eq!(child_dir("token/cache.rs"), "token/cache/");
    assert_eq!(child_dir("lib.rs"), "");
}
