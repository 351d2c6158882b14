//! What a script's `catch (e)` gets when a bound function fails: a map with the error's kind,
//! its message and, where the error has them, the argument and the file; what is printed when
//! nothing catches it is the message alone, as before the map.

use infusion_repl::app::{build_engine, describe, error_kind, rt, ScriptConfig, Session, Thrown};
use infusion_repl::ErrorKind;
use rhai::{Dynamic, EvalAltResult, Map};

use crate::common::{run_bin, stderr_of};

fn session() -> std::sync::Arc<Session> {
    Session::new(ScriptConfig {
        no_images: true,
        progress: false,
        ..ScriptConfig::default()
    })
}

/// What `script` gives, or its error.
fn run(script: &str) -> Result<Dynamic, Box<EvalAltResult>> {
    build_engine(&session()).eval::<Dynamic>(script)
}

/// The map `catch (e)` got for the error of `call`.
fn caught(call: &str) -> Map {
    let v = run(&format!(
        "let r = (); try {{ {call}; }} catch (e) {{ r = e; }} r"
    ))
    .unwrap_or_else(|e| panic!("{call}: {e}"));
    v.try_cast::<Map>()
        .unwrap_or_else(|| panic!("{call}: caught no map"))
}

fn text(m: &Map, k: &str) -> String {
    m.get(k)
        .unwrap_or_else(|| panic!("no `{k}` in {m:?}"))
        .to_string()
}

/// A bad argument of the library (the device) and a bad option of the binding (an unknown key,
/// a wrong type) are `invalid_argument`, naming the argument as scripts spell it.
#[test]
fn a_bad_argument_is_caught_with_its_kind_and_name() {
    let e = caught(r#"load_model("models/tiny-sd", #{device: "gpu"})"#);
    assert_eq!(text(&e, "kind"), "invalid_argument");
    assert_eq!(text(&e, "arg"), "device");
    assert_eq!(
        text(&e, "message"),
        "invalid argument `device`: `gpu`: expected cpu, cuda or cuda:N"
    );
    assert!(!e.contains_key("path"), "{e:?}");

    let e = caught(r#"load_model("models/tiny-sd", #{devise: "cpu"})"#);
    assert_eq!(
        (text(&e, "kind"), text(&e, "arg")),
        ("invalid_argument".into(), "devise".into())
    );
    let e = caught(r#"load_model("models/tiny-sd", #{device: 3})"#);
    assert_eq!(text(&e, "arg"), "device");
    assert!(
        text(&e, "message").contains("option `device` must be"),
        "{e:?}"
    );
}

/// A file that is not there is `io`, with the file.
#[test]
fn a_missing_file_is_io() {
    let e = caught(r#"load_image("no/such/image.png")"#);
    assert_eq!(text(&e, "kind"), "io");
    assert_eq!(text(&e, "path"), "no/such/image.png");
    assert!(!e.contains_key("arg"), "{e:?}");
    let e = caught(r#"import "no_such_module" as x; x::f()"#);
    assert_eq!(text(&e, "kind"), "io");
}

/// Uncaught, the error prints as it always did: the message, not the map; rethrown, the same.
#[test]
fn an_uncaught_error_prints_its_message() {
    let call = r#"load_model("models/tiny-sd", #{device: "gpu"})"#;
    let expected = "invalid argument `device`: `gpu`: expected cpu, cuda or cuda:N";
    for script in [
        call.to_string(),
        format!("try {{ {call} }} catch (e) {{ throw e }}"),
        format!("fn load() {{ {call} }} load()"),
    ] {
        let e = run(&script).unwrap_err();
        assert_eq!(describe(&e).0, expected, "{script}");
        assert_eq!(error_kind(&e), Some(ErrorKind::InvalidArgument), "{script}");
    }
    // A recipe prints FILE:LINE:COL: message, with the line and a caret.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("r.rhai"),
        "let x = 1;\ntry { load_image(\"gone.png\") } catch (e) { print(e.kind); throw e }\n",
    )
    .unwrap();
    let o = run_bin(&["r.rhai"], dir.path());
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "io");
    let err = stderr_of(&o);
    assert!(
        err.starts_with("r.rhai:2:") && err.contains(": gone.png: ") && !err.contains("#{"),
        "{err}"
    );
}

/// Rhai's own errors are its maps, with a message and no kind; a thrown value is itself.
#[test]
fn rhai_errors_and_thrown_values_keep_their_shape() {
    let e = caught("no_such_function(1)");
    assert!(
        !e.contains_key("kind") && e.contains_key("message"),
        "{e:?}"
    );
    let v = run(r#"let r = (); try { throw "mine" } catch (e) { r = e; } r"#).unwrap();
    assert_eq!(v.into_string().unwrap(), "mine");
}

/// A cancelled job (Ctrl-C) stops the script whether or not it is inside a `try`: the host
/// sees the kind `cancelled` and prints "cancelled", as the REPL and the recipe runner do.
#[test]
fn a_cancelled_job_is_cancelled_and_no_try_catches_it() {
    let script = r#"let r = "ran on"; try { stop_here(); } catch (e) { r = e.kind; } r"#;
    // Cancelled inside a bound function: its `Error::Cancelled` through `rt`.
    let s = session();
    let mut engine = build_engine(&s);
    let job = s.job.clone();
    engine.register_fn("stop_here", move || {
        job.cancel();
        rt(job.check())
    });
    let e = engine.eval::<Dynamic>(script).unwrap_err();
    assert_eq!(error_kind(&e), Some(ErrorKind::Cancelled), "{e}");
    assert_eq!(describe(&e).0, "cancelled");
    // Cancelled before: the engine's progress check stops it at once.
    let s = session();
    let mut engine = build_engine(&s);
    engine.register_fn("stop_here", || ());
    s.job.cancel();
    let e = engine.eval::<Dynamic>(script).unwrap_err();
    assert_eq!(error_kind(&e), Some(ErrorKind::Cancelled), "{e}");
    assert_eq!(describe(&e).0, "cancelled");
}

/// Every kind has its own name, and a map made from an error reads back as it.
#[test]
fn kinds_have_distinct_names_and_survive_the_map() {
    let mut names: Vec<&str> = ErrorKind::ALL.iter().map(|k| k.name()).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), ErrorKind::ALL.len());
    for kind in ErrorKind::ALL {
        let t = Thrown::new(kind, "what").arg("a").path("f.png");
        assert_eq!(Thrown::from_value(&t.to_value()), Some(t));
    }
}
