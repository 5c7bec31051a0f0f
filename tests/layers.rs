//! The crate's files import each other without cycles: every `crate::…` path in a file of
//! `src/` (tests excluded) is an edge to the file of the module it names, and the graph must
//! be acyclic, so that each file knows its layer and nothing low depends on anything high.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("src/ is readable") {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` -> `a::b`; `lib.rs`/`main.rs` -> `<root>`.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file
        .strip_prefix(src)
        .expect("under src/")
        .with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if parts.last().is_some_and(|p| p == "mod") {
        parts.pop();
    }
    if parts == ["lib"] || parts == ["main"] {
        return "<root>".into();
    }
    parts.join("::")
}

/// The text without `#[cfg(test)] mod … { … }` blocks and `//` comments.
fn production_code(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let after = &rest[at..];
        let Some(open) = after.find('{') else {
            rest = "";
            break;
        };
        let mut depth = 0usize;
        let mut end = after.len();
        for (i, ch) in after[open..].char_indices() {
            match ch {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = open + i + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        rest = &after[end..];
    }
    out.push_str(rest);
    out.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Module paths named after `crate::` (with `crate::a::{b, c}` expanded).
fn crate_paths(code: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        let tail = &code[at + "crate::".len()..];
        let path: String = tail
            .chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect();
        let path = path.trim_end_matches(':').to_string();
        let after = &tail[path.len()..];
        if let Some(group) = after.strip_prefix("::{") {
            let group = group.split('}').next().unwrap_or("");
            for item in group.split(',') {
                let item = item.trim().split(" as ").next().unwrap_or("").trim();
                if !item.is_empty() && item != "self" {
                    out.push(format!("{path}::{item}"));
                }
            }
        }
        out.push(path);
    }
    out
}

/// Every file's module and the modules its production code names.
fn import_graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(&src, f)).collect();
    let resolve = |path: &str| -> Option<String> {
        let parts: Vec<&str> = path.split("::").collect();
        (1..=parts.len())
            .rev()
            .map(|k| parts[..k].join("::"))
            .find(|m| modules.contains(m))
    };
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in &files {
        let from = module_of(&src, file);
        let code = production_code(&std::fs::read_to_string(file).expect("readable"));
        let targets = edges.entry(from.clone()).or_default();
        for path in crate_paths(&code) {
            if let Some(to) = resolve(&path) {
                if to != from {
                    targets.insert(to);
                }
            }
        }
    }
    edges
}

/// The first cycle in `edges`, if any.
fn find_cycle(edges: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    // Depth-first search for a back edge; report the cycle it closes.
    fn visit(
        node: &str,
        edges: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        stack: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(node.to_string(), 1);
        stack.push(node.to_string());
        for next in edges.get(node).into_iter().flatten() {
            match state.get(next.as_str()).copied().unwrap_or(0) {
                1 => {
                    let start = stack.iter().position(|n| n == next).unwrap_or(0);
                    let mut cycle = stack[start..].to_vec();
                    cycle.push(next.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(next, edges, state, stack) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        stack.pop();
        state.insert(node.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for node in edges.keys() {
        if state.get(node.as_str()).copied().unwrap_or(0) == 0 {
            let mut stack = Vec::new();
            if let Some(cycle) = visit(node, edges, &mut state, &mut stack) {
                return Some(cycle);
            }
        }
    }
    None
}

/// The graph with every module cut to its first `depth` segments (`a::b::c` -> `a::b`).
fn at_depth(
    edges: &BTreeMap<String, BTreeSet<String>>,
    depth: usize,
) -> BTreeMap<String, BTreeSet<String>> {
    let cut = |m: &str| m.split("::").take(depth).collect::<Vec<_>>().join("::");
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (from, tos) in edges {
        let from = cut(from);
        let targets = out.entry(from.clone()).or_default();
        for to in tos {
            let to = cut(to);
            // A module and its own children are one node at this depth.
            if to != from
                && !to.starts_with(&format!("{from}::"))
                && !from.starts_with(&format!("{to}::"))
            {
                targets.insert(to);
            }
        }
    }
    out
}

#[test]
fn no_file_of_src_imports_itself_back() {
    if let Some(cycle) = find_cycle(&import_graph()) {
        panic!("import cycle between files of src/: {}", cycle.join(" -> "));
    }
}

#[test]
fn no_module_of_src_imports_itself_back_at_any_depth() {
    let edges = import_graph();
    for depth in 1..=3 {
        if let Some(cycle) = find_cycle(&at_depth(&edges, depth)) {
            panic!(
                "import cycle between modules of src/ (cut at depth {depth}): {}",
                cycle.join(" -> ")
            );
        }
    }
}

/// The layers of `lib.rs`: each may import only what is listed (besides itself).
#[test]
fn each_layer_imports_only_the_layers_below_it() {
    let allowed: &[(&str, &[&str])] = &[
        ("core", &["metrics"]),
        ("backends", &["core", "metrics"]),
        ("metrics", &[]),
        ("tls", &[]),
    ];
    let top = at_depth(&import_graph(), 1);
    for (layer, may) in allowed {
        for to in top.get(*layer).into_iter().flatten() {
            assert!(
                may.contains(&to.as_str()),
                "`{layer}` imports `{to}`, above or beside it; allowed: {may:?}"
            );
        }
    }
}
