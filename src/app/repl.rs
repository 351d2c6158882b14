//! The interactive REPL: rustyline over one Rhai engine and one scope kept across inputs.
//!
//! Each input is compiled and merged into the session's AST, so functions defined at the prompt
//! persist, and the AST's statements are cleared after they ran, so they never run again.
//! An unfinished `{`, `(`, `[`, string or comment continues on the next line.

use std::borrow::Cow;
use std::cell::RefCell;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use rhai::{Dynamic, Engine, EvalAltResult, Expr, Scope, Stmt, AST};
use rustyline::completion::{Completer, FilenameCompleter, Pair};
use rustyline::error::ReadlineError;
use rustyline::highlight::Highlighter;
use rustyline::hint::{Hinter, HistoryHinter};
use rustyline::history::DefaultHistory;
use rustyline::validate::{ValidationContext, ValidationResult, Validator};
use rustyline::{CompletionType, Context, Editor, Helper};

use crate::app::script::api::concepts::ConceptVal;
use crate::app::script::api::generation::Gen;
use crate::app::script::api::images::{show, Img};
use crate::app::script::api::model::Model;
use crate::app::script::api::recipes::usage_of;
use crate::app::script::api::tensors::TensorVal;
use crate::app::script::{build_engine, caret, describe, format_error, Docs, Session};
use crate::app::signals::Signals;

const KEYWORDS: &[&str] = &[
    "let", "const", "fn", "if", "else", "for", "in", "while", "loop", "break", "continue",
    "return", "import", "as", "true", "false", "print",
];

/// A line on standard output that cannot fail the session (see `app::stdout`).
macro_rules! say {
    ($($t:tt)*) => {
        crate::app::stdout::line_or_say(format!($($t)*))
    };
}

const COMMANDS: &[&str] = &[":help", ":scope", ":load", ":quit"];

/// Whether `input` is unfinished: an open bracket, string or block comment at its end.
pub fn is_incomplete(input: &str) -> bool {
    let mut depth: i64 = 0;
    let mut chars = input.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            // A backtick string may span lines; a "string" only with a `\` ending the line
            // (Rhai's continuation): unclosed without one it is an error, shown at once.
            '"' | '`' => {
                let quote = c;
                let mut closed = false;
                let mut continued = false;
                while let Some(d) = chars.next() {
                    if d == '\\' && quote == '"' {
                        continued = matches!(chars.next(), None | Some('\n'));
                    } else if d == quote {
                        closed = true;
                        break;
                    } else {
                        continued = false;
                    }
                }
                if !closed {
                    return quote == '`' || continued;
                }
            }
            '\'' => {
                // a character literal: 'a' or '\n'
                if chars.next() == Some('\\') {
                    chars.next();
                }
                chars.next();
            }
            '/' if chars.peek() == Some(&'/') => {
                for d in chars.by_ref() {
                    if d == '\n' {
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut closed = false;
                let mut prev = ' ';
                for d in chars.by_ref() {
                    if prev == '*' && d == '/' {
                        closed = true;
                        break;
                    }
                    prev = d;
                }
                if !closed {
                    return true;
                }
            }
            _ => {}
        }
    }
    depth > 0
}

/// Names the completer offers, refreshed after every input.
#[derive(Default)]
struct Names {
    functions: Vec<String>,
    variables: Vec<String>,
    /// Each variable's type name (`Generation`).
    types: HashMap<String, String>,
    /// Each type's properties and methods, from the declarations.
    members: HashMap<String, Vec<String>>,
    /// Each imported module's functions and constants, by its alias (`p` of `import "prompts"
    /// as p`): what `p::` completes to.
    modules: HashMap<String, Vec<String>>,
}

impl Names {
    /// After `var.`: the members of `var`'s type, or when it is not a declared type (an array,
    /// a string, unknown) every member and function, as any function can be called so.
    fn members_of(&self, var: &str) -> Vec<&str> {
        match self.types.get(var).and_then(|t| self.members.get(t)) {
            Some(m) => m.iter().map(String::as_str).collect(),
            None => self
                .members
                .values()
                .flatten()
                .chain(&self.functions)
                .map(String::as_str)
                .collect(),
        }
    }
}

/// Each declared type's properties and methods.
fn members(docs: &Docs) -> HashMap<String, Vec<String>> {
    let mut m: HashMap<String, Vec<String>> = HashMap::new();
    for t in &docs.types {
        let entry = m.entry(t.name.to_string()).or_default();
        entry.extend(t.getters.iter().map(|g| g.name.to_string()));
    }
    for f in &docs.functions {
        if let Some(r) = f.receiver {
            m.entry(r.to_string()).or_default().push(f.name.to_string());
        }
    }
    m
}

struct ReplHelper {
    names: Rc<RefCell<Names>>,
    files: FilenameCompleter,
    hinter: HistoryHinter,
}

/// Byte offset where the string literal containing `pos` starts (after its quote), if `pos` is
/// inside one on this line.
fn open_string_start(line: &str, pos: usize) -> Option<usize> {
    let mut start = None;
    let mut escaped = false;
    for (i, c) in line[..pos].char_indices() {
        match (start, c) {
            (Some(_), '\\') if !escaped => {
                escaped = true;
                continue;
            }
            (Some(_), '"') if !escaped => start = None,
            (None, '"') => start = Some(i + 1),
            _ => {}
        }
        escaped = false;
    }
    start
}

impl Completer for ReplHelper {
    type Candidate = Pair;

    fn complete(
        &self,
        line: &str,
        pos: usize,
        ctx: &Context<'_>,
    ) -> rustyline::Result<(usize, Vec<Pair>)> {
        if open_string_start(line, pos).is_some() {
            return self
                .files
                .complete_path(line, pos)
                .or_else(|_| self.files.complete(line, pos, ctx));
        }
        let start = line[..pos]
            .char_indices()
            .rev()
            .find(|(_, c)| !(c.is_alphanumeric() || *c == '_' || *c == ':'))
            .map(|(i, c)| i + c.len_utf8())
            .unwrap_or(0);
        let word = &line[start..pos];
        let names = self.names.borrow();
        let receiver = line[..start].strip_suffix('.').map(|before| {
            let from = before
                .char_indices()
                .rev()
                .find(|(_, c)| !(c.is_alphanumeric() || *c == '_'))
                .map_or(0, |(i, c)| i + c.len_utf8());
            &before[from..]
        });
        let module = word.rsplit_once("::");
        let mut out: Vec<Pair> = if let Some((alias, prefix)) = module {
            // `p::fi` -> `p::fill`: the members of the module imported as `p`.
            names
                .modules
                .get(alias)
                .into_iter()
                .flatten()
                .filter(|n| n.starts_with(prefix))
                .map(|n| Pair {
                    display: n.to_string(),
                    replacement: format!("{alias}::{n}"),
                })
                .collect()
        } else if let Some(var) = receiver {
            names
                .members_of(var)
                .into_iter()
                .filter(|n| n.starts_with(word))
                .map(|n| Pair {
                    display: n.to_string(),
                    replacement: n.to_string(),
                })
                .collect()
        } else if word.starts_with(':') {
            COMMANDS
                .iter()
                .filter(|c| c.starts_with(word))
                .map(|c| Pair {
                    display: c.to_string(),
                    replacement: c.to_string(),
                })
                .collect()
        } else {
            names
                .functions
                .iter()
                .chain(&names.variables)
                .map(String::as_str)
                .chain(KEYWORDS.iter().copied())
                .filter(|n| n.starts_with(word) && !word.is_empty())
                .map(|n| Pair {
                    display: n.to_string(),
                    replacement: n.to_string(),
                })
                .collect()
        };
        out.sort_by(|a, b| a.display.cmp(&b.display));
        out.dedup_by(|a, b| a.display == b.display);
        Ok((start, out))
    }
}

impl Hinter for ReplHelper {
    type Hint = String;
    fn hint(&self, line: &str, pos: usize, ctx: &Context<'_>) -> Option<String> {
        self.hinter.hint(line, pos, ctx)
    }
}

impl Highlighter for ReplHelper {
    /// The history hint in grey (colour 90, which terminals without "dim" show too), so it is
    /// never taken for typed text: Right-arrow takes it, Tab completes.
    fn highlight_hint<'h>(&self, hint: &'h str) -> Cow<'h, str> {
        Cow::Owned(format!("\x1b[90m{hint}\x1b[0m"))
    }
}

impl Validator for ReplHelper {
    fn validate(&self, ctx: &mut ValidationContext) -> rustyline::Result<ValidationResult> {
        let input = ctx.input();
        if !input.trim_start().starts_with(':') && is_incomplete(input) {
            Ok(ValidationResult::Incomplete)
        } else {
            Ok(ValidationResult::Valid(None))
        }
    }
}

impl Helper for ReplHelper {}

fn history_path() -> Option<PathBuf> {
    dirs::data_dir().map(|d| d.join("infusion-repl").join("history.txt"))
}

/// The words of a command's arguments; a double-quoted word may hold spaces.
fn split_words(s: &str) -> Vec<String> {
    let mut words = vec![];
    let mut word = String::new();
    let (mut quoted, mut started) = (false, false);
    for c in s.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                started = true;
            }
            c if c.is_whitespace() && !quoted => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(word);
    }
    words
}

/// The error under the input line that caused it: the line, a caret, the message.
fn print_error(input: &str, err: &EvalAltResult) {
    let (msg, pos) = describe(err);
    match caret(input, pos) {
        Some((_, _, lines)) => eprintln!("{lines} {msg}"),
        None => eprintln!("error: {msg}"),
    }
}

/// `:help`, `:help NAME`, wrapped for a terminal `width` columns wide.
fn print_help(docs: &Docs, topic: &str, width: usize) {
    if topic.is_empty() {
        print!("{}", docs.index());
        say!(
            "Commands: :help [NAME], :scope (variables, functions, imports), :load FILE [ARGS...] \
             (run a script here), :quit"
        );
        say!("Ctrl-C cancels a running generation or training; Ctrl-D leaves.");
        return;
    }
    match docs.help(topic, width) {
        Some(text) => say!("{text}"),
        None => {
            let near = docs.near(topic);
            say!(
                "nothing named `{topic}`{}",
                if near.is_empty() {
                    String::new()
                } else {
                    format!(" (did you mean {}?)", near.join(", "))
                }
            );
        }
    }
}

/// A one-line description of a value, and shows images.
fn print_value(session: &Session, value: &Dynamic) {
    if value.is_unit() {
        return;
    }
    if let Some(img) = value.clone().try_cast::<Img>() {
        if let Err(e) = show(session, &img) {
            print_error("", &e);
        }
        return;
    }
    let text = describe_value(value);
    say!("{text}");
}

fn describe_value(value: &Dynamic) -> String {
    macro_rules! try_display {
        ($($t:ty),*) => {
            $(if let Some(v) = value.clone().try_cast::<$t>() {
                return v.to_string();
            })*
        };
    }
    try_display!(Model, Gen, ConceptVal, TensorVal, Img);
    if value.is_array() {
        let arr = value.clone().into_array().unwrap_or_default();
        let items: Vec<String> = arr.iter().map(describe_value).collect();
        return format!("[{}]", items.join(", "));
    }
    if value.is_map() {
        let map = value.clone().cast::<rhai::Map>();
        let items: Vec<String> = map
            .iter()
            .map(|(k, v)| format!("{k}: {}", describe_value(v)))
            .collect();
        return format!("#{{{}}}", items.join(", "));
    }
    if value.is_string() {
        return format!("{:?}", value.to_string());
    }
    value.to_string()
}

struct Repl {
    session: Arc<Session>,
    engine: Engine,
    scope: Scope<'static>,
    ast: AST,
    /// Whether an input failed (a piped session exits non-zero then).
    failed: bool,
    /// The modules imported for the session, by alias: the path imported and the module's
    /// functions and constants (for `:scope` and completion).
    imports: std::collections::BTreeMap<String, (String, Vec<String>)>,
}

impl Repl {
    /// Keeps the modules `ast` imports at its top level for the inputs that follow, as
    /// variables are kept: each becomes a static module under its alias.
    fn keep_imports(&mut self, ast: &AST, source: Option<&str>) {
        for stmt in ast.statements() {
            let Stmt::Import(x, pos) = stmt else {
                continue;
            };
            let (Expr::StringConstant(path, _), alias) = (&x.0, &x.1) else {
                continue;
            };
            if alias.name.is_empty() {
                continue;
            }
            if let Ok(module) =
                self.engine
                    .module_resolver()
                    .resolve(&self.engine, source, path, *pos)
            {
                let mut members: Vec<String> = module
                    .iter_script_fn_info()
                    .filter(|(_, access, ..)| *access == rhai::FnAccess::Public)
                    .map(|(_, _, name, ..)| name.to_string())
                    .chain(module.iter_var().map(|(name, _)| name.to_string()))
                    .collect();
                members.sort();
                members.dedup();
                self.imports
                    .insert(alias.name.to_string(), (path.to_string(), members));
                self.engine
                    .register_static_module(alias.name.as_str(), module);
            }
        }
    }

    /// Compiles and runs one input; functions it defines stay, statements do not. Errors are
    /// shown under the input, or as `FILE:LINE:COL` for a file (`origin`).
    fn eval(&mut self, input: &str, origin: Option<&str>) {
        self.session.job.reset();
        let show = |e: &EvalAltResult| match origin {
            Some(name) => eprintln!("{}", format_error(name, input, e)),
            None => print_error(input, e),
        };
        let new = match self.engine.compile_with_scope(&self.scope, input) {
            Ok(ast) => ast,
            Err(e) => {
                show(&e.into());
                self.failed = true;
                return;
            }
        };
        let imports = new.clone_statements_only();
        self.ast += new;
        // A file's imports come from its own folder first; the prompt's from the current one.
        match origin {
            Some(file) => self.ast.set_source(file),
            None => self.ast.clear_source(),
        };
        // A bug that panics in a bound function must not end the session.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.engine
                .eval_ast_with_scope::<Dynamic>(&mut self.scope, &self.ast)
        }));
        self.ast.clear_statements();
        self.keep_imports(&imports, origin);
        self.failed |= !matches!(result, Ok(Ok(_)));
        match result {
            Ok(Ok(v)) => print_value(&self.session, &v),
            Ok(Err(e)) => match (usage_of(&e), origin) {
                // `:load FILE --help`: the usage and the file's header, as the recipe runner
                // prints them.
                (Some(u), Some(_)) if u.problem.is_none() => {
                    say!("{u}\n\n{}", crate::app::script::header(input))
                }
                (Some(u), _) => eprintln!("{u}"),
                (None, _) => show(&e),
            },
            Err(_) => {
                eprintln!("error: internal error (a bug: please report it); the session goes on")
            }
        }
        self.session.job.reset();
        // The binary keeps freed memory while a job runs (main.rs); the session between
        // inputs holds only what it keeps.
        crate::util::memory::release_freed();
    }

    /// Runs a file in the session with `args` as its `ARGS`, as the recipe runner does.
    fn load(&mut self, path: &Path, args: &[String]) {
        // A FIFO or device would block the session: only regular files are read.
        let text = crate::util::fs::read_regular(path).and_then(|b| {
            String::from_utf8(b).map_err(|e| {
                crate::error::Error::io(
                    path,
                    std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                )
            })
        });
        match text {
            Ok(src) => {
                let argv: rhai::Array = args.iter().map(|a| Dynamic::from(a.clone())).collect();
                self.scope.set_value("ARGS", argv);
                self.eval(&src, Some(&path.display().to_string()));
            }
            Err(e) => {
                eprintln!("error: {e}");
                self.failed = true;
            }
        }
    }

    /// `:scope`: the variables with their types and values, the functions defined in the
    /// session, and the modules imported (with what each holds).
    fn print_scope(&self) {
        let functions: Vec<String> = self
            .ast
            .iter_functions()
            .map(|f| format!("fn {}({})", f.name, f.params.join(", ")))
            .collect();
        if self.scope.is_empty() && functions.is_empty() && self.imports.is_empty() {
            say!("(no variables, functions or imports)");
        }
        let short = |mut text: String| {
            if text.chars().count() > 70 {
                text = text.chars().take(67).collect();
                text.push_str("...");
            }
            text
        };
        for (name, constant, value) in self.scope.iter() {
            let text = short(describe_value(&value));
            let kw = if constant { "const" } else { "let" };
            let ty = self.engine.map_type_name(value.type_name());
            say!("{kw} {name}: {ty} = {text}");
        }
        for f in functions {
            say!("{f}");
        }
        for (alias, (path, members)) in &self.imports {
            say!(
                "import {path:?} as {alias}: {}",
                short(
                    members
                        .iter()
                        .map(|m| format!("{alias}::{m}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            );
        }
    }

    fn function_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .engine
            .gen_fn_signatures(false)
            .into_iter()
            .chain(self.ast.iter_functions().map(|f| f.name.to_string()))
            .filter_map(|s| s.split('(').next().map(|n| n.trim().to_string()))
            .map(|n| n.rsplit(' ').next().unwrap_or(&n).to_string())
            .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_alphanumeric() || c == '_'))
            .collect();
        names.sort();
        names.dedup();
        names
    }
}

/// Runs the REPL until `:quit` or Ctrl-D.
pub fn run(session: Arc<Session>, signals: &Signals) -> std::process::ExitCode {
    let engine = build_engine(&session);
    let mut repl = Repl {
        session,
        engine,
        scope: Scope::new(),
        ast: AST::empty(),
        failed: false,
        imports: Default::default(),
    };
    let names = Rc::new(RefCell::new(Names {
        functions: repl.function_names(),
        variables: vec![],
        types: HashMap::new(),
        members: members(&repl.session.docs()),
        modules: HashMap::new(),
    }));
    let config = rustyline::Config::builder()
        .completion_type(CompletionType::List)
        .auto_add_history(true)
        .build();
    let mut rl: Editor<ReplHelper, DefaultHistory> = match Editor::with_config(config) {
        Ok(rl) => rl,
        Err(e) => {
            eprintln!("error: cannot start the line editor: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    rl.set_helper(Some(ReplHelper {
        names: names.clone(),
        files: FilenameCompleter::new(),
        hinter: HistoryHinter::new(),
    }));
    let history = history_path();
    if let Some(h) = &history {
        let _ = rl.load_history(h);
    }
    if std::io::stdin().is_terminal() {
        say!(
            "infusion-repl {}: :help lists the functions, Ctrl-D leaves.",
            env!("CARGO_PKG_VERSION")
        );
    }
    loop {
        // SIGTERM during a command: it stopped (training kept what it learned); leave now.
        if signals.terminated() {
            break;
        }
        // Waiting at the prompt there is no job to stop: SIGTERM ends the session at once.
        signals.set_idle(true);
        let line = rl.readline("infusion> ");
        signals.set_idle(false);
        match line {
            Ok(line) => {
                let input = line.trim();
                if input.is_empty() {
                    continue;
                }
                if let Some(cmd) = input.strip_prefix(':') {
                    let (name, arg) = cmd.split_once(char::is_whitespace).unwrap_or((cmd, ""));
                    match name {
                        "quit" | "q" | "exit" => break,
                        "help" | "h" => {
                            let width = rl.dimensions().map_or(100, |(cols, _)| cols as usize);
                            print_help(&repl.session.docs(), arg.trim(), width.clamp(40, 120))
                        }
                        "scope" => repl.print_scope(),
                        "load" => {
                            let mut words = split_words(arg);
                            if words.is_empty() {
                                eprintln!("usage: :load FILE [ARGS...]");
                                repl.failed = true;
                            } else {
                                let file = words.remove(0);
                                repl.load(Path::new(&file), &words);
                            }
                        }
                        other => {
                            eprintln!("unknown command :{other} ({})", COMMANDS.join(", "));
                            repl.failed = true;
                        }
                    }
                } else {
                    repl.eval(&line, None);
                }
                let mut n = names.borrow_mut();
                n.variables = repl.scope.iter().map(|(k, _, _)| k.to_string()).collect();
                n.types = repl
                    .scope
                    .iter()
                    .map(|(k, _, v)| {
                        let ty = repl.engine.map_type_name(v.type_name()).to_string();
                        (k.to_string(), ty)
                    })
                    .collect();
                n.functions = repl.function_names();
                n.modules = repl
                    .imports
                    .iter()
                    .map(|(alias, (_, members))| (alias.clone(), members.clone()))
                    .collect();
            }
            // Ctrl-C at the prompt clears the line.
            Err(ReadlineError::Interrupted) => continue,
            Err(ReadlineError::Eof) => break,
            Err(e) => {
                eprintln!("error: {e}");
                break;
            }
        }
    }
    if let Some(h) = &history {
        if let Some(dir) = h.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        let _ = rl.save_history(h);
    }
    if signals.terminated() {
        signals.stop_status()
    } else if (repl.failed && !std::io::stdin().is_terminal()) || crate::app::stdout::failed() {
        // Piped input is a script: a line that failed fails it, as a recipe's error would.
        std::process::ExitCode::FAILURE
    } else {
        std::process::ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unfinished_brackets_strings_and_comments_continue() {
        for s in [
            "fn f(x) {",
            "let a = [1,",
            "print(\"abc \\",
            "let s = `multi",
            "/* note",
            "f(g(1)",
        ] {
            assert!(is_incomplete(s), "{s}");
        }
        for s in [
            "fn f(x) { x }",
            "print(\"abc",
            "let a = \"{\";",
            "let c = '(';",
            "// (",
            "/* ( */ 1",
            "x)",
        ] {
            assert!(!is_incomplete(s), "{s}");
        }
    }

    #[test]
    fn completion_offers_functions_variables_commands_and_paths() {
        let helper = ReplHelper {
            names: Rc::new(RefCell::new(Names {
                functions: vec!["generate".into(), "grid".into(), "load_model".into()],
                variables: vec!["gallery".into(), "g".into()],
                types: HashMap::from([("g".into(), "Generation".into())]),
                members: HashMap::from([
                    (
                        "Generation".into(),
                        vec!["base".into(), "base_latents".into(), "custom".into()],
                    ),
                    ("Concept".into(), vec!["word".into(), "base_model".into()]),
                ]),
                modules: HashMap::from([(
                    "p".into(),
                    vec![
                        "OBJECT_PROMPTS".into(),
                        "LIVE_PROMPTS".into(),
                        "fill".into(),
                    ],
                )]),
            })),
            files: FilenameCompleter::new(),
            hinter: HistoryHinter::new(),
        };
        let history = DefaultHistory::new();
        let ctx = Context::new(&history);
        let words = |line: &str| {
            let (start, c) = helper.complete(line, line.len(), &ctx).unwrap();
            (
                start,
                c.into_iter().map(|p| p.replacement).collect::<Vec<_>>(),
            )
        };
        assert_eq!(
            words("let x = g"),
            (
                8,
                vec![
                    "g".into(),
                    "gallery".into(),
                    "generate".into(),
                    "grid".into()
                ]
            )
        );
        assert_eq!(words("m.gen").1, vec!["generate".to_string()]);
        assert_eq!(words(":he").1, vec![":help".to_string()]);
        // After a dot: the members of the variable's type only.
        assert_eq!(
            words("show(g.ba"),
            (7, vec!["base".into(), "base_latents".into()])
        );
        assert_eq!(words("g.c").1, vec!["custom".to_string()]);
        // A value of unknown type: every type's members.
        assert_eq!(words("x.base_m").1, vec!["base_model".to_string()]);
        // After `p::`, the members of the module imported as `p` (issue 21, item 11).
        assert_eq!(
            words("print(p::OB"),
            (6, vec!["p::OBJECT_PROMPTS".to_string()])
        );
        assert_eq!(
            words("p::").1,
            ["p::LIVE_PROMPTS", "p::OBJECT_PROMPTS", "p::fill"]
        );
        assert!(words("q::f").1.is_empty(), "no module q");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("mycat.safetensors"), "").unwrap();
        let line = format!("load_concept(\"{}/myc", dir.path().display());
        let (_, c) = words(&line);
        assert!(c.iter().any(|p| p.ends_with("mycat.safetensors")), "{c:?}");
    }

    #[test]
    fn command_words_may_be_quoted() {
        assert_eq!(
            split_words(r#"scripts/q.rhai "a red cat" --steps 3"#),
            ["scripts/q.rhai", "a red cat", "--steps", "3"]
        );
        assert_eq!(split_words("  "), Vec::<String>::new());
        assert_eq!(split_words(r#"f """#), ["f", ""]);
    }

    #[test]
    fn string_starts_are_found_for_file_completion() {
        assert_eq!(open_string_start("load_concept(\"mod", 17), Some(14));
        assert_eq!(open_string_start("f(\"a\", x", 8), None);
        assert_eq!(open_string_start("f(\"a\\\"b", 7), Some(3));
    }
}
