//! The crate's layout rules, checked on its source (the `# Layout` doc of
//! `src/lib.rs` states them):
//! - dependencies between top-level modules point one way, down the layers
//!   below, so the module graph has no cycle;
//! - nothing below the session names it;
//! - no source file of the product crates is over 800 lines.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Bottom to top; a module may use modules of lower layers only.
const LAYERS: &[&[&str]] = &[
    &["protocol", "metrics", "auth", "stream"],
    &["backend"],
    &["cancel"],
    &["routed", "cache"],
    &["state", "error"],
    &["session"],
    &["server", "admin"],
    &["lib", "main"],
];

fn layer(m: &str) -> usize {
    LAYERS.iter().position(|l| l.contains(&m)).unwrap_or_else(|| panic!("module `{m}` is in no layer of tests/layout.rs: place it"))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).expect("read_dir").flatten() {
        let p = e.path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The top-level module a file of `src/` belongs to.
fn top_module(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).expect("under src");
    let first = rel.components().next().expect("component").as_os_str().to_string_lossy().to_string();
    first.trim_end_matches(".rs").to_string()
}

/// First path segments after every `crate::` in `text`, including each item of
/// a `crate::{a, b::c, d::{e, f}}` group.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let before = rest[..i].chars().last();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue; // e.g. `shardgate_router::...crate::` never occurs, but `mycrate::` could
        }
        if let Some(group) = rest.strip_prefix('{') {
            // top-level items of the group
            let (mut depth, mut item, mut start) = (0usize, String::new(), true);
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        start = true;
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && start {
                    if c.is_alphanumeric() || c == '_' {
                        item.push(c);
                    } else if !item.is_empty() {
                        out.insert(std::mem::take(&mut item));
                        start = false;
                    }
                }
            }
            if !item.is_empty() {
                out.insert(item);
            }
        } else {
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                out.insert(name);
            }
        }
    }
    out
}

fn module_graph() -> BTreeMap<String, BTreeMap<String, Vec<PathBuf>>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut graph: BTreeMap<String, BTreeMap<String, Vec<PathBuf>>> = BTreeMap::new();
    for f in files {
        let from = top_module(&src, &f);
        let text = std::fs::read_to_string(&f).expect("read");
        for to in crate_refs(&text) {
            if to != from && to != "self" && to != "super" {
                graph.entry(from.clone()).or_default().entry(to).or_default().push(f.clone());
            }
        }
    }
    graph
}

#[test]
fn the_crate_references_parse() {
    let refs = crate_refs("use crate::{metrics as m, backend::{pool, Pool}, routed::exec};\nlet x = crate::stream::write_all(a);");
    assert_eq!(refs.into_iter().collect::<Vec<_>>(), ["backend", "metrics", "routed", "stream"]);
}

#[test]
fn dependencies_point_down_the_layers() {
    let graph = module_graph();
    let mut upward = Vec::new();
    for (from, tos) in &graph {
        for (to, files) in tos {
            if layer(to) >= layer(from) {
                upward.push(format!("{from} -> {to} (in {})", files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(", ")));
            }
        }
    }
    assert!(upward.is_empty(), "imports that do not point down the layers:\n{}", upward.join("\n"));
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = module_graph();
    // depth-first search with colours: reaching a grey node is a cycle
    fn visit<'a>(n: &'a str, g: &'a BTreeMap<String, BTreeMap<String, Vec<PathBuf>>>, colour: &mut BTreeMap<&'a str, u8>, path: &mut Vec<&'a str>) {
        match colour.get(n) {
            Some(2) => return,
            Some(1) => panic!("cycle: {} -> {n}", path.join(" -> ")),
            _ => {}
        }
        colour.insert(n, 1);
        path.push(n);
        if let Some(tos) = g.get(n) {
            for to in tos.keys() {
                visit(to, g, colour, path);
            }
        }
        path.pop();
        colour.insert(n, 2);
    }
    let mut colour = BTreeMap::new();
    for n in graph.keys() {
        visit(n, &graph, &mut colour, &mut Vec::new());
    }
}

#[test]
fn nothing_below_the_session_names_it() {
    let graph = module_graph();
    for below in ["routed", "cache", "backend", "protocol"] {
        let names = graph.get(below).and_then(|t| t.get("session"));
        assert!(names.is_none(), "{below} names the session in {names:?}");
    }
}

#[test]
fn no_source_file_is_over_800_lines() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace");
    let mut files = Vec::new();
    for krate in ["proxy", "router", "config", "migrate"] {
        rust_files(&root.join(krate).join("src"), &mut files);
    }
    assert!(files.len() > 50, "found only {} files", files.len());
    let long: Vec<String> = files
        .iter()
        .filter_map(|f| {
            let n = std::fs::read_to_string(f).expect("read").lines().count();
            (n > 800).then(|| format!("{} ({n} lines)", f.display()))
        })
        .collect();
    assert!(long.is_empty(), "files over 800 lines: {long:?}");
}

#[test]
fn sqlstates_are_written_in_one_place() {
    // string literals shaped like a SQLSTATE of a PostgreSQL error class
    const CLASSES: &[&str] = &[
        "00", "01", "02", "03", "08", "09", "0A", "0B", "0F", "0L", "0P", "0Z", "20", "21", "22", "23", "24", "25", "26", "27", "28", "2B", "2D", "2F", "34", "38", "39", "3B",
        "3D", "3F", "40", "42", "44", "53", "54", "55", "57", "58", "72", "F0", "HV", "P0", "XX",
    ];
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut found = Vec::new();
    for f in files.iter().filter(|f| !f.ends_with("protocol/sqlstate.rs")) {
        let text = std::fs::read_to_string(f).expect("read");
        let b = text.as_bytes();
        for i in 0..b.len().saturating_sub(6) {
            let lit = &b[i..i + 7];
            if lit[0] == b'"' && lit[6] == b'"' && lit[1..6].iter().all(|c| c.is_ascii_digit() || c.is_ascii_uppercase()) && CLASSES.iter().any(|c| c.as_bytes() == &lit[1..3]) {
                let line = text[..i].lines().count();
                found.push(format!("{}:{line}: {}", f.display(), String::from_utf8_lossy(lit)));
            }
        }
    }
    assert!(found.is_empty(), "SQLSTATE literals outside protocol/sqlstate.rs (name them there):\n{}", found.join("\n"));
}
