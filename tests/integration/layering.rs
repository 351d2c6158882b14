//! The rooms of `src/` stay as built (issue 22, item 4): each folder (or top-level file) may
//! import only the rooms below it, as this table says. A new import that points up or
//! sideways fails here, naming the file, the line and the room it reaches.

use std::collections::BTreeMap;
use std::path::Path;

use crate::common::repo;

/// Each room and the rooms it may import (besides itself), from the bottom up.
const ALLOWED: &[(&str, &[&str])] = &[
    ("error", &[]),
    ("assets", &[]),
    ("job", &["error"]),
    ("util", &["error", "job"]),
    // The model takes its files from its load options, not from where the tool is installed.
    ("sd", &["error", "job", "util"]),
    ("train", &["error", "job", "util", "sd"]),
    // The paper's method.
    ("infusion", &["error", "job", "util", "sd", "train"]),
    // Every method behind one seam (Infusion's through `methods/infusion.rs`).
    (
        "methods",
        &["error", "job", "util", "sd", "train", "infusion"],
    ),
    // F beside C for any method.
    (
        "customize",
        &["error", "job", "util", "sd", "train", "infusion", "methods"],
    ),
    (
        "metrics",
        &[
            "error",
            "job",
            "util",
            "sd",
            "train",
            "infusion",
            "methods",
            "customize",
        ],
    ),
    ("toy", &["error", "job", "util", "sd", "train", "metrics"]),
    // The paper's comparison: every method trained and measured, in cells.
    (
        "compare",
        &[
            "error",
            "job",
            "util",
            "sd",
            "train",
            "infusion",
            "methods",
            "customize",
            "metrics",
        ],
    ),
    // One library call per user action.
    (
        "actions",
        &[
            "error",
            "job",
            "util",
            "assets",
            "sd",
            "train",
            "infusion",
            "methods",
            "customize",
            "metrics",
            "compare",
        ],
    ),
    // The front ends: anything.
    (
        "app",
        &[
            "error",
            "job",
            "util",
            "assets",
            "sd",
            "train",
            "infusion",
            "methods",
            "customize",
            "metrics",
            "toy",
            "compare",
            "actions",
        ],
    ),
    ("lib", &[]),
    ("main", &[]),
];

/// The room a source file belongs to: its folder under `src/`, or its own name.
fn room(file: &Path, src: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel.components().next().unwrap().as_os_str();
    Path::new(first)
        .file_stem()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The rooms `crate::ROOM` names on a line of code (comments left out); a name the crate root
/// re-exports (`crate::Result`) stands for its room, as `src/lib.rs` says
/// (`reexports`: name -> room).
fn reached_with(line: &str, reexports: &BTreeMap<String, String>) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    code.match_indices("crate::")
        .map(|(i, _)| {
            code[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect::<String>()
        })
        .filter(|r| !r.is_empty())
        .map(|r| reexports.get(&r).cloned().unwrap_or(r))
        .collect()
}

fn reached(line: &str) -> Vec<String> {
    reached_with(line, &BTreeMap::new())
}

/// What `src/lib.rs` re-exports at the root (`pub use ROOM::...::{A, B}`), by name.
fn reexports(lib: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut text = lib.to_string();
    // A `pub use` may run over several lines: read each statement up to its `;`.
    while let Some(start) = text.find("pub use ") {
        let rest = &text[start + 8..];
        let end = rest.find(';').unwrap_or(rest.len());
        let stmt = rest[..end].to_string();
        let room = stmt.split("::").next().unwrap_or("").trim().to_string();
        let names = stmt
            .rsplit("::")
            .next()
            .unwrap_or("")
            .trim_matches(|c| c == '{' || c == '}' || char::is_whitespace(c));
        for name in names.split(',') {
            let name = name.trim();
            if !name.is_empty() {
                out.insert(name.to_string(), room.clone());
            }
        }
        text = rest[end..].to_string();
    }
    out
}

#[test]
fn every_room_imports_only_the_rooms_below_it() {
    let src = repo().join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut files = vec![];
    rust_files(&src, &mut files);
    files.sort();
    let reexports = reexports(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    assert_eq!(reexports.get("Result").map(String::as_str), Some("error"));
    let mut violations = vec![];
    let mut rooms_seen = std::collections::BTreeSet::new();
    for file in &files {
        let from = room(file, &src);
        rooms_seen.insert(from.clone());
        let Some(ok) = allowed.get(from.as_str()) else {
            violations.push(format!(
                "{}: room `{from}` is not in the table",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            for to in reached_with(line, &reexports) {
                if to != from && !ok.contains(&to.as_str()) {
                    violations.push(format!(
                        "{}:{}: `{from}` reaches `{to}`: {}",
                        file.strip_prefix(&src).unwrap().display(),
                        n + 1,
                        line.trim()
                    ));
                }
            }
        }
    }
    // The table is about the rooms there are: every room of the table exists.
    for (room, _) in ALLOWED {
        assert!(
            rooms_seen.contains(*room),
            "the table names `{room}`, which src/ has not"
        );
    }
    assert!(
        violations.is_empty(),
        "imports that point up or sideways:\n{}",
        violations.join("\n")
    );
}

/// The check itself sees an import that points up (it would pass whatever the code did if it
/// saw nothing).
#[test]
fn the_check_sees_imports_and_skips_comments() {
    assert_eq!(reached("use crate::app::cli;"), ["app"]);
    assert_eq!(
        reached("let x = crate::sd::device::parse(crate::util::x()); // crate::app"),
        ["sd", "util"]
    );
    assert!(reached("//! see [`crate::customize`]").is_empty());
}
