//! Where `import "name"` looks: the importing file's own folder (a recipe's, a module's, a file
//! `:load`ed in the REPL) or, for what is typed at the REPL's prompt, the current folder; then
//! the stdlib. A module that is nowhere is an error naming every folder searched.

use std::path::{Path, PathBuf};

use rhai::module_resolvers::FileModuleResolver;
use rhai::{Engine, EvalAltResult, Module, Position, Shared};

use super::Thrown;
use crate::ErrorKind;

type SharedModule = Shared<Module>;

/// The engine's module resolver (see the module docs).
pub struct Imports {
    stdlib: PathBuf,
    /// Loads and caches modules by their full path.
    files: FileModuleResolver,
}

impl Imports {
    pub fn new(stdlib: &Path) -> Self {
        Self {
            stdlib: stdlib.to_path_buf(),
            files: FileModuleResolver::new(),
        }
    }

    /// The folders searched for an import from `source` (the importing file; `None` at the
    /// prompt), in order.
    pub fn folders(&self, source: Option<&str>) -> Vec<PathBuf> {
        let first = match source.map(Path::new) {
            Some(file) => match file.parent() {
                Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
                _ => PathBuf::from("."),
            },
            None => PathBuf::from("."),
        };
        let mut folders = vec![first];
        if !folders.contains(&self.stdlib) {
            folders.push(self.stdlib.clone());
        }
        folders
    }
}

/// `folder` as an error shows it: `.` as the current folder's full path.
fn shown(folder: &Path) -> String {
    match folder.canonicalize() {
        Ok(full) => full.display().to_string(),
        Err(_) => folder.display().to_string(),
    }
}

/// An `io` error about `file` (see [`Thrown`]), at the import.
fn error(msg: String, file: &Path, pos: Position) -> Box<EvalAltResult> {
    let thrown = Thrown::new(ErrorKind::Io, msg).path(file);
    Box::new(EvalAltResult::ErrorRuntime(thrown.to_value(), pos))
}

impl rhai::ModuleResolver for Imports {
    fn resolve(
        &self,
        engine: &Engine,
        source: Option<&str>,
        path: &str,
        pos: Position,
    ) -> Result<SharedModule, Box<EvalAltResult>> {
        let file_name = Path::new(path).with_extension("rhai");
        let candidates: Vec<PathBuf> = if file_name.is_absolute() {
            vec![file_name.clone()]
        } else {
            self.folders(source)
                .iter()
                .map(|f| f.join(&file_name))
                .collect()
        };
        for file in &candidates {
            let Ok(meta) = std::fs::metadata(file) else {
                continue;
            };
            // A FIFO or device would block the session on its first read.
            if !meta.is_file() {
                return Err(error(
                    format!("import {path:?}: {} is not a regular file", file.display()),
                    file,
                    pos,
                ));
            }
            let full = file.canonicalize().unwrap_or_else(|_| file.clone());
            return self
                .files
                .resolve(engine, source, &full.to_string_lossy(), pos);
        }
        let searched: Vec<String> = candidates
            .iter()
            .map(|c| shown(c.parent().unwrap_or(Path::new("."))))
            .collect();
        Err(error(
            format!(
                "module {path:?} not found: no {} in {}",
                file_name.display(),
                searched.join(", ")
            ),
            &file_name,
            pos,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_imports_from_its_folder_the_prompt_from_the_current_one_then_the_stdlib() {
        let imports = Imports::new(Path::new("/opt/stdlib"));
        assert_eq!(
            imports.folders(Some("/work/recipes/r.rhai")),
            vec![PathBuf::from("/work/recipes"), PathBuf::from("/opt/stdlib")]
        );
        assert_eq!(
            imports.folders(Some("r.rhai")),
            vec![PathBuf::from("."), PathBuf::from("/opt/stdlib")]
        );
        assert_eq!(
            imports.folders(None),
            vec![PathBuf::from("."), PathBuf::from("/opt/stdlib")]
        );
    }
}
