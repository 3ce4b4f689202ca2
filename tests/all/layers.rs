//! The library's modules depend one way (src/lib.rs): the C boundary and what stands on a head, then
//! the head, then the two seams (`backend`, `comm`) side by side and unaware of each other, then the
//! vocabulary they share. Every path a source file names (`use` lines, paths in code, macro bodies
//! included) is read with a Rust tokenizer and resolved to the file that defines it; the test fails
//! on a dependency upward, between the seams, or in a cycle of files.

use proc_macro2::{Delimiter, TokenStream, TokenTree};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Layers from the top; a module may use its own layer and those below it.
const LAYERS: &[(&str, &[&str])] = &[
    ("boundary", &["ffi", "checkpoint", "export", "index"]),
    ("head", &["head"]),
    ("seams", &["backend", "comm"]),
    (
        "vocabulary",
        &["batch", "config", "error", "fsutil", "limits", "margin", "memory", "pool", "rng", "sharding", "simd", "state", "storage", "topk"],
    ),
];

/// Every file module of src/ (but the crate root and the `pfc` binary), by module path.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, out);
                continue;
            }
            let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
            let rel = path.strip_prefix(&src).expect("under src/").with_extension("");
            let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
            if parts[0] == "bin" || parts == ["lib"] || path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            if parts.last().is_some_and(|p| p == "mod") {
                parts.pop();
            }
            out.insert(parts.join("::"), std::fs::read_to_string(&path).expect("a readable source file"));
        }
    }
    let mut out = BTreeMap::new();
    walk(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut out);
    out
}

/// Reads the paths of one file (`file`, its module path) into `deps`. `children` are the file's
/// out-of-line child modules, nameable bare; `read`'s `scope` is the module path where the tokens
/// stand (the file's, then inline modules').
struct Reader<'a> {
    known: &'a BTreeSet<String>,
    /// Items src/lib.rs re-exports at the crate root, and the module each comes from.
    root_items: &'a BTreeMap<String, String>,
    /// Paths that name no module: a dependency the graph would miss.
    unresolved: BTreeSet<String>,
    children: BTreeSet<String>,
    file: Vec<String>,
    deps: BTreeSet<String>,
}

impl Reader<'_> {
    /// The deepest file module that `path` (from the crate root) lies in, or the module a crate-root
    /// re-export comes from; anything else is kept as unresolved.
    fn resolve(&mut self, path: &[String]) {
        for n in (1..=path.len()).rev() {
            let module = path[..n].join("::");
            if self.known.contains(&module) {
                self.deps.insert(module);
                return;
            }
        }
        match path.first().and_then(|item| self.root_items.get(item)) {
            Some(module) => {
                self.deps.insert(module.clone());
            }
            None => {
                self.unresolved.insert(format!("crate::{}", path.join("::")));
            }
        }
    }

    fn read(&mut self, tokens: TokenStream, scope: &[String]) {
        let tokens: Vec<TokenTree> = tokens.into_iter().collect();
        let mut i = 0;
        while i < tokens.len() {
            // An inline module: its tokens stand one level deeper.
            if let (TokenTree::Ident(kw), Some(TokenTree::Ident(name)), Some(TokenTree::Group(body))) =
                (&tokens[i], tokens.get(i + 1), tokens.get(i + 2))
            {
                if kw == "mod" && body.delimiter() == Delimiter::Brace {
                    let mut inner = scope.to_vec();
                    inner.push(name.to_string());
                    self.read(body.stream(), &inner);
                    i += 3;
                    continue;
                }
            }
            match &tokens[i] {
                TokenTree::Group(g) => self.read(g.stream(), scope),
                // A path starts where a name is followed by `::` (not `pub(super)`).
                TokenTree::Ident(id) if !preceded_by_colons(&tokens, i) && is_colons(&tokens, i + 1) => {
                    let name = id.to_string();
                    let start = match name.as_str() {
                        "crate" => Some(Vec::new()),
                        "self" => Some(scope.to_vec()),
                        "super" => Some(scope[..scope.len() - 1].to_vec()),
                        _ if scope == self.file.as_slice() && self.children.contains(&name) => {
                            Some([scope, &[name]].concat())
                        }
                        _ => None,
                    };
                    if let Some(base) = start {
                        i = self.path_from(&tokens, i + 1, base);
                        continue;
                    }
                }
                _ => {}
            }
            i += 1;
        }
    }

    /// Follows `:: segment` pairs from `tokens[i]`, expanding `{ … }` groups of `use` trees;
    /// returns the index after the path.
    fn path_from(&mut self, tokens: &[TokenTree], mut i: usize, mut path: Vec<String>) -> usize {
        while is_colons(tokens, i) {
            match tokens.get(i + 2) {
                Some(TokenTree::Ident(seg)) if seg == "super" => {
                    path.pop();
                }
                Some(TokenTree::Ident(seg)) => path.push(seg.to_string()),
                Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Brace => {
                    let items: Vec<TokenTree> = g.stream().into_iter().collect();
                    for item in items.split(|t| matches!(t, TokenTree::Punct(p) if p.as_char() == ',')) {
                        self.use_tree(item, path.clone());
                    }
                    return i + 3;
                }
                _ => break,
            }
            i += 3;
        }
        self.resolve(&path);
        i
    }

    /// One item of a `use` group, relative to `path`.
    fn use_tree(&mut self, item: &[TokenTree], mut path: Vec<String>) {
        match item.first() {
            Some(TokenTree::Ident(seg)) if seg != "self" => {
                path.push(seg.to_string());
                self.path_from(item, 1, path);
            }
            // `self`, `*`, or nothing (a trailing comma): the group's own path.
            _ => self.resolve(&path),
        }
    }
}

/// `tokens[i..i + 2]` is `::`.
fn is_colons(tokens: &[TokenTree], i: usize) -> bool {
    matches!((tokens.get(i), tokens.get(i + 1)), (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b))) if a.as_char() == ':' && b.as_char() == ':')
}

/// Whether the identifier at `i` continues a path (`x::ident`), so it does not start one.
fn preceded_by_colons(tokens: &[TokenTree], i: usize) -> bool {
    i >= 2 && is_colons(tokens, i - 2)
}

/// The items src/lib.rs re-exports (`pub use module::{A, B};`), each with its module.
fn root_items() -> BTreeMap<String, String> {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).expect("src/lib.rs is readable");
    let tokens: Vec<TokenTree> = lib.parse::<TokenStream>().expect("src/lib.rs tokenizes").into_iter().collect();
    let mut items = BTreeMap::new();
    for i in 0..tokens.len() {
        if let (TokenTree::Ident(kw), Some(TokenTree::Ident(module))) = (&tokens[i], tokens.get(i + 1)) {
            if kw != "use" || !is_colons(&tokens, i + 2) {
                continue;
            }
            let names: Vec<TokenTree> = match tokens.get(i + 4) {
                Some(TokenTree::Group(g)) => g.stream().into_iter().collect(),
                Some(t) => vec![t.clone()],
                None => Vec::new(),
            };
            for name in names {
                if let TokenTree::Ident(name) = name {
                    items.insert(name.to_string(), module.to_string());
                }
            }
        }
    }
    items
}

/// Each file module's dependencies on other file modules, and the paths that named none.
fn read_sources() -> (BTreeMap<String, BTreeSet<String>>, BTreeSet<String>) {
    let files = modules();
    let known: BTreeSet<String> = files.keys().cloned().collect();
    let root_items = root_items();
    let mut unresolved = BTreeSet::new();
    let graph = files
        .iter()
        .map(|(module, text)| {
            let tokens: TokenStream = text.parse().unwrap_or_else(|e| panic!("src module {module} does not tokenize: {e:?}"));
            let file: Vec<String> = module.split("::").map(String::from).collect();
            let children = known
                .iter()
                .filter_map(|k| k.strip_prefix(&format!("{module}::")).filter(|rest| !rest.contains("::")).map(String::from))
                .collect();
            let mut reader = Reader { known: &known, root_items: &root_items, unresolved: BTreeSet::new(), children, file: file.clone(), deps: BTreeSet::new() };
            reader.read(tokens, &file);
            reader.deps.remove(module);
            unresolved.extend(reader.unresolved.into_iter().map(|path| format!("{module}: {path}")));
            (module.clone(), reader.deps)
        })
        .collect();
    (graph, unresolved)
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    read_sources().0
}

#[test]
fn every_path_names_a_module() {
    // A path the reader cannot place (a glob of the crate root, an item the crate root does not
    // re-export) would be a dependency the other tests never see.
    let (_, unresolved) = read_sources();
    assert!(unresolved.is_empty(), "paths that name no module of src/:\n{}", unresolved.iter().cloned().collect::<Vec<_>>().join("\n"));
}

fn layer_of(module: &str) -> usize {
    let top = module.split("::").next().expect("a module path");
    LAYERS
        .iter()
        .position(|(_, members)| members.contains(&top))
        .unwrap_or_else(|| panic!("src module {module} is in no layer: add it to LAYERS in tests/all/layers.rs and to src/lib.rs's account"))
}

#[test]
fn dependencies_run_downward_only() {
    let mut upward = Vec::new();
    for (from, deps) in graph() {
        for to in deps {
            if layer_of(&to) < layer_of(&from) {
                upward.push(format!("{from} ({}) uses {to} ({})", LAYERS[layer_of(&from)].0, LAYERS[layer_of(&to)].0));
            }
        }
    }
    assert!(upward.is_empty(), "dependencies upward:\n{}", upward.join("\n"));
}

#[test]
fn compute_and_collectives_do_not_know_each_other() {
    let top = |m: &str| m.split("::").next().unwrap_or_default().to_string();
    let crossing: Vec<String> = graph()
        .into_iter()
        .flat_map(|(from, deps)| deps.into_iter().map(move |to| (from.clone(), to)))
        .filter(|(from, to)| matches!((top(from).as_str(), top(to).as_str()), ("backend", "comm") | ("comm", "backend")))
        .map(|(from, to)| format!("{from} uses {to}"))
        .collect();
    assert!(crossing.is_empty(), "the seams reach each other:\n{}", crossing.join("\n"));
}

#[test]
fn no_file_depends_on_itself_through_others() {
    let graph = graph();
    let reaches = |from: &str, target: &str| {
        let mut seen = BTreeSet::new();
        let mut stack = vec![from.to_string()];
        while let Some(m) = stack.pop() {
            for next in graph.get(&m).into_iter().flatten() {
                if next == target {
                    return true;
                }
                if seen.insert(next.clone()) {
                    stack.push(next.clone());
                }
            }
        }
        false
    };
    let cycles: Vec<String> = graph
        .iter()
        .flat_map(|(from, deps)| deps.iter().filter(|to| reaches(to, from)).map(move |to| format!("{from} -> {to} -> … -> {from}")))
        .collect();
    assert!(cycles.is_empty(), "cycles between files:\n{}", cycles.join("\n"));
}

#[test]
fn the_reader_sees_the_kinds_of_paths_the_sources_use() {
    // A test of the test: each way of naming a module that src/ uses is seen.
    let graph = graph();
    let has = |from: &str, to: &str| graph.get(from).is_some_and(|d| d.contains(to));
    assert!(has("head::factory", "comm::local"), "use crate::a::b::Item");
    assert!(has("backend::cpu", "backend::step"), "use super::step::{{…}}");
    assert!(has("backend::cpu", "backend::cpu::optimizer"), "use child::{{…}} of an out-of-line child");
    assert!(has("rng", "simd"), "a path to a macro");
    assert!(has("head", "head::search"), "child::function in code");
    assert!(has("backend::cuda::step", "backend::cuda::device"), "use super::child::Item");
    assert!(!has("backend::cpu::kernels", "backend::cpu"), "super:: inside an inline test module is the file itself");
    assert!(!has("ffi::head", "ffi"), "pub(super) is a visibility, not a use");
}
