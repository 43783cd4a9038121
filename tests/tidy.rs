//! Tidiness that review would otherwise have to catch, as rust-analyzer's tidy test does: every
//! source file says what it is in its first line, modules import each other one way only, no
//! run of code is pasted twice, and CONTRIBUTING.md names the files it promises.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

fn files(dirs: &[&str]) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for dir in dirs {
        rust_files(&root().join(dir), &mut out);
    }
    out.sort();
    out
}

/// The code of a file without its unit tests.
fn code(path: &Path) -> String {
    let text = fs::read_to_string(path).unwrap();
    match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => text[..i].to_owned(),
        None => text,
    }
}

#[test]
fn every_file_opens_with_a_doc_line() {
    let missing: Vec<_> = files(&["src", "tests", "benches", "xtask/src", "xtask/tests"])
        .into_iter()
        .filter(|f| !fs::read_to_string(f).unwrap().starts_with("//!"))
        .collect();
    assert!(
        missing.is_empty(),
        "open these with a `//!` line saying what they are: {missing:#?}"
    );
}

/// A module as the layering sees it: a top-level entry of `src/`, and for the folders whose
/// parts are layers of their own, one level deeper.
fn module_of(rel: &str) -> String {
    let parts: Vec<&str> = rel.trim_end_matches(".rs").split('/').collect();
    match parts.as_slice() {
        [top, sub, ..] if SPLIT.contains(top) && *sub != "mod" => format!("{top}::{sub}"),
        [top, ..] => (*top).to_owned(),
        [] => String::new(),
    }
}

const SPLIT: [&str; 4] = ["backend", "engine", "workspace", "sys"];

fn imports(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("crate::") {
        let path: String = text[i + 7..]
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let segs: Vec<&str> = path.split("::").filter(|s| !s.is_empty()).collect();
        let Some(first) = segs.first() else { continue };
        if !first.starts_with(|c: char| c.is_ascii_lowercase()) {
            continue;
        }
        match segs.get(1) {
            Some(second)
                if SPLIT.contains(first)
                    && second.starts_with(|c: char| c.is_ascii_lowercase()) =>
            {
                out.insert(format!("{first}::{second}"));
            }
            _ => {
                out.insert((*first).to_owned());
            }
        }
    }
    out
}

#[test]
fn modules_import_each_other_one_way() {
    let src = root().join("src");
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files(&["src"]) {
        let rel = file
            .strip_prefix(&src)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let from = module_of(&rel);
        // The crate's table of contents and its joined error name every layer by design.
        if ["lib", "error", "bin"].contains(&from.as_str()) {
            continue;
        }
        for to in imports(&code(&file)) {
            let same_folder =
                to.split("::").next() == from.split("::").next() && !to.contains("::");
            if to != from && !["error", "Error", "Result"].contains(&to.as_str()) && !same_folder {
                edges.entry(from.clone()).or_default().insert(to);
            }
        }
    }
    // Depth-first search for a path back to where it started.
    fn reaches(
        edges: &BTreeMap<String, BTreeSet<String>>,
        from: &str,
        to: &str,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        edges
            .get(from)
            .into_iter()
            .flatten()
            .any(|next| next == to || (seen.insert(next.clone()) && reaches(edges, next, to, seen)))
    }
    let circles: Vec<String> = edges
        .iter()
        .flat_map(|(from, tos)| tos.iter().map(move |to| (from, to)))
        .filter(|(from, to)| reaches(&edges, to, from, &mut BTreeSet::new()))
        .map(|(from, to)| format!("{from} -> {to}"))
        .collect();
    assert!(
        circles.is_empty(),
        "these imports close a circle (cli -> workspace -> backend -> engine -> sys, one way): {circles:#?}"
    );
}

/// A line as the twin search sees it: trimmed, and nothing for lines that carry no logic.
fn normalized(line: &str) -> Option<String> {
    let t = line.trim();
    let thin = t.is_empty()
        || t.starts_with("//")
        || t.starts_with("use ")
        || t.starts_with("#[")
        || t.chars().all(|c| "{}()[];,.?".contains(c));
    (!thin).then(|| t.to_owned())
}

#[test]
fn no_run_of_code_is_pasted_twice() {
    const RUN: usize = 8;
    let mut seen: HashMap<Vec<String>, (PathBuf, usize)> = HashMap::new();
    let mut twins = Vec::new();
    for file in files(&["src", "xtask/src"]) {
        // Signatures are what a trait dictates; the bodies are what could be pasted.
        let mut in_signature = false;
        let lines: Vec<(usize, String)> = code(&file)
            .lines()
            .enumerate()
            .filter(|(_, l)| {
                let t = l.trim_start();
                let starts =
                    t.starts_with("fn ") || t.starts_with("pub fn ") || t.starts_with("pub(");
                in_signature |= starts && t.contains("fn ");
                let inside = in_signature;
                if in_signature && (t.ends_with('{') || t.ends_with(';')) {
                    in_signature = false;
                }
                !inside
            })
            .filter_map(|(i, l)| Some((i + 1, normalized(l)?)))
            .collect();
        let mut last_end = 0;
        for window in lines.windows(RUN) {
            let key: Vec<String> = window.iter().map(|(_, l)| l.clone()).collect();
            let (line, end) = (window[0].0, window[RUN - 1].0);
            match seen.get(&key) {
                Some((other, at)) if (other != &file || *at + RUN <= line) && line > last_end => {
                    twins.push(format!(
                        "{}:{line} repeats {}:{at}",
                        file.display(),
                        other.display()
                    ));
                    last_end = end;
                }
                Some(_) => {}
                None => {
                    seen.insert(key, (file.clone(), line));
                }
            }
        }
    }
    assert!(
        twins.is_empty(),
        "make one piece of code serve both: {twins:#?}"
    );
}

#[test]
fn contributing_names_files_that_exist() {
    let text = fs::read_to_string(root().join("CONTRIBUTING.md")).unwrap();
    let named: Vec<&str> = text
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.starts_with("src/") && !s.contains('<'))
        .collect();
    assert!(named.len() >= 5, "CONTRIBUTING.md names the files to touch");
    for path in named {
        assert!(
            root().join(path).exists(),
            "CONTRIBUTING.md names {path}, which is gone"
        );
    }
}
