//! The metric bindings through the same engine the REPL and the runner use.

use infusion_repl::app::{build_engine, ScriptConfig, Session};
use rhai::{Dynamic, Scope};

use crate::common::repo;

fn eval(script: &str) -> Dynamic {
    let session = Session::new(ScriptConfig {
        no_images: true,
        progress: false,
        ..ScriptConfig::default()
    });
    let engine = build_engine(&session);
    let mut scope = Scope::new();
    scope.push("REPO", repo().display().to_string());
    engine
        .eval_with_scope::<Dynamic>(&mut scope, script)
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn scores_and_distances_from_scripts() {
    let v = eval(
        r#"
        let m = load_model();
        let clip = load_clip();
        let dino = load_dino();
        let refs = `${REPO}/assets/example-concept`;
        let a = []; let b = []; let imgs = [];
        for s in 0..3 {
            let g = m.generate("a photo of a teapot", #{seed: s, steps: 2});
            a.push(g.base_latents);
            b.push(m.generate("a photo of a cat", #{seed: s + 10, steps: 2}).base_latents);
            imgs.push(g.base);
        }
        #{
            w_same: wasserstein(a, a),
            w: wasserstein(a, b),
            w2: wasserstein2(a, b),
            pooled: wasserstein(a, b, #{pool: 2}),
            ct: clip_t(clip, imgs, ["a photo of a teapot"]),
            ci: clip_i(clip, imgs, refs),
            di: dino_i(dino, imgs, refs),
            shape: clip.image_embeds(imgs).shape,
            tshape: clip.text_embeds("a cat").shape,
            dshape: dino.embeds(imgs).shape,
            f0: fisher_divergence(m, m, ["a photo of a dog"], #{samples: 2, steps: 2}).mean,
        }
        "#,
    );
    let m = v.cast::<rhai::Map>();
    let f = |k: &str| m[k].as_float().unwrap_or_else(|_| panic!("{k}: {}", m[k]));
    assert!(f("w_same") < 1e-5);
    assert!(f("w") > 0.0);
    assert!((f("w2") - f("w") * f("w")).abs() < 1e-6 * f("w2").max(1.0));
    assert!(f("pooled") > 0.0 && f("pooled") != f("w"));
    for k in ["ct", "ci", "di"] {
        assert!(f(k).abs() <= 1.0, "{k}");
    }
    assert_eq!(m["shape"].to_string(), "[3, 16]");
    assert_eq!(m["tshape"].to_string(), "[1, 16]");
    assert_eq!(m["dshape"].to_string(), "[3, 32]");
    assert_eq!(f("f0"), 0.0, "a model against itself");
}

/// The stdlib ships DreamBooth's two evaluation lists whole (25 object prompts with the 5
/// property prompts, 25 live-subject prompts) and the training templates train_concept uses.
#[test]
fn the_stdlib_prompt_lists_are_dreamboths() {
    let v = eval(
        r#"
        import "prompts" as p;
        let all = p::OBJECT_PROMPTS + p::LIVE_PROMPTS;
        let each_has_one_slot = all.all(|x| x.split("{}").len() == 2);
        [p::OBJECT_PROMPTS.len(), p::LIVE_PROMPTS.len(), each_has_one_slot,
         p::OBJECT_PROMPTS[24], p::LIVE_PROMPTS[13], p::TEMPLATES.len(), p::TEMPLATES[0],
         p::fill(p::OBJECT_PROMPTS[20], "<pot>")]
        "#,
    );
    let v: Vec<String> = v
        .cast::<rhai::Array>()
        .iter()
        .map(|x| x.to_string())
        .collect();
    assert_eq!(
        v,
        [
            "25",
            "25",
            "true",
            "a cube shaped {}",
            "a {} wearing a black top hat and a monocle",
            "10",
            "a photo of a {}",
            "a red <pot>",
        ]
    );
}

/// Errors of a bound function name its options as the script spells them, never as the
/// command line does.
#[test]
fn option_errors_use_the_script_names() {
    let session = Session::new(ScriptConfig::default());
    let e = build_engine(&session)
        .eval::<Dynamic>(r#"load_model("models/tiny-sd", #{device: "gpu"})"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("`device`: `gpu`"), "{e}");
    assert!(!e.contains("--device"), "{e}");
}

/// `load_model`'s `kernels` option: each model runs what it was loaded with and tells it
/// (`m.kernels`), a second model loaded fused leaves the first one naive, `:help load_model`
/// shows the option, and an unknown value is an error that names the option and the choices.
#[test]
fn kernels_are_chosen_per_model_from_scripts() {
    use infusion_repl::sd::fused_calls_on_this_thread;
    // The scripts run on this test's thread: the fused-call counter is per thread.
    let before = fused_calls_on_this_thread();
    let v = eval(
        r#"
        let n = load_model();
        let f = load_model(#{kernels: "fused"});
        let p = load_model(`${REPO}/models/tiny-sd`, #{kernels: "naive"});
        n.generate("a cat", #{steps: 1, maps: false});
        p.generate("a cat", #{steps: 1, maps: false});
        [n.kernels, f.kernels, p.kernels, `${f}`]
        "#,
    );
    let v: Vec<String> = v
        .cast::<rhai::Array>()
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect();
    assert_eq!(v[..3], ["naive", "fused", "naive"]);
    assert!(v[3].contains("fused kernels"), "{}", v[3]);
    assert_eq!(
        fused_calls_on_this_thread(),
        before,
        "loading a fused model changes nothing for the naive ones"
    );
    let _ = eval(r#"load_model(#{kernels: "fused"}).generate("a cat", #{steps: 1, maps: false})"#);
    let after = fused_calls_on_this_thread();
    assert!(after.group_norm > before.group_norm && after.attention > before.attention);

    let session = Session::new(ScriptConfig::default());
    let e = build_engine(&session)
        .eval::<Dynamic>(r#"load_model(#{kernels: "flash"})"#)
        .unwrap_err();
    let e = infusion_repl::app::describe(&e).0;
    assert!(
        e.contains("`kernels`") && e.contains(r#""naive" | "fused""#) && e.contains("flash"),
        "{e}"
    );
    let help = session.docs().help("load_model", 200).unwrap();
    assert!(
        help.contains(r#"kernels          "naive" | "fused" = "naive""#),
        "{help}"
    );
    // The session's default is --kernels (ScriptConfig's model request).
    let fused_session = Session::new(ScriptConfig {
        model: infusion_repl::actions::ModelRequest {
            kernels: infusion_repl::sd::Kernels::Fused,
            ..ScriptConfig::default().model
        },
        ..ScriptConfig::default()
    });
    let k = build_engine(&fused_session)
        .eval::<Dynamic>(
            r#"[load_model().kernels, load_model(#{kernels: "naive"}).kernels,
                device_info().default_kernels]"#,
        )
        .unwrap()
        .to_string();
    assert_eq!(k, r#"["fused", "naive", "fused"]"#);
}

/// `generate`'s `scheduler` and `karras` options: another sampler gives another image from the
/// same seed, an unknown name lists the known ones.
#[test]
fn generate_takes_a_scheduler() {
    let d = eval(
        r#"let m = load_model(); let a = m.generate("a teapot", #{steps: 4, seed: 2});
           let b = m.generate("a teapot", #{steps: 4, seed: 2, scheduler: "euler", karras: true});
           let c = m.generate("a teapot", #{steps: 4, seed: 2, scheduler: "euler", karras: true});
           let ma = a.base_latents.mean();
           let mb = b.base_latents.mean();
           [a.scheduler, b.scheduler, ma == mb, mb == c.base_latents.mean()]"#,
    );
    let v: Vec<String> = d
        .into_array()
        .unwrap()
        .into_iter()
        .map(|x| x.to_string())
        .collect();
    assert_eq!(v, ["ddim", "euler karras", "false", "true"]);
    let session = Session::new(ScriptConfig::default());
    let e = build_engine(&session)
        .eval::<Dynamic>(r#"load_model().generate("x", #{scheduler: "lms"})"#)
        .unwrap_err()
        .to_string();
    assert!(e.contains("scheduler") && e.contains("dpmpp_2m"), "{e}");
}
