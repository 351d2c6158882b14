//! The toy lab in scripts: `toy_model`, `toy.customize`, sampling and the measures.

use std::path::Path;
use std::sync::Arc;

use rhai::{Array, Dynamic, Map, FLOAT, INT};

use super::Api;
use crate::app::script::docs::{FnSpec, Kind};
use crate::app::script::{err, rt, Opts, RhaiResult, Session};
use crate::toy::{
    count_modes, customize, fisher, CustomRun, Customization, CustomizeOptions, Layout, Point, Toy,
    ToyMethod, ToyTrainOptions,
};

/// A toy foundation (cheap to clone).
#[derive(Clone)]
pub struct ToyVal(pub Arc<Toy>);

/// A customized toy at one of its snapshots.
#[derive(Clone)]
pub struct CustomVal {
    pub toy: Arc<Toy>,
    pub run: Arc<CustomRun>,
    pub step: usize,
}

impl CustomVal {
    pub fn custom(&self) -> RhaiResult<&Customization> {
        rt(self.run.at(self.step))
    }
}

impl std::fmt::Display for ToyVal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Toy({}, concepts {}, {} steps)",
            self.0.layout.name(),
            self.0.layout.concepts().join(" "),
            self.0.steps
        )
    }
}

impl std::fmt::Display for CustomVal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ToyCustom({}, {} of {}, step {})",
            self.run.last.method.name(),
            self.toy.layout.concepts()[self.run.last.concept],
            self.toy.layout.name(),
            self.step
        )
    }
}

/// A concept given by index or name.
pub fn concept_arg(toy: &Toy, v: &Dynamic) -> RhaiResult<usize> {
    let c = if let Ok(i) = v.as_int() {
        if i < 0 {
            return Err(err(format!("concept {i}: indices start at 0")));
        }
        i as usize
    } else if v.is_string() {
        rt(toy.layout.concept(&v.to_string()))?
    } else {
        return Err(err(format!(
            "concept: an index or a name, not {}",
            v.type_name()
        )));
    };
    rt(toy.check_concept(c))?;
    Ok(c)
}

fn points_to_array(points: &[Point]) -> Array {
    points
        .iter()
        .map(|p| {
            Dynamic::from(vec![
                Dynamic::from(p[0] as FLOAT),
                Dynamic::from(p[1] as FLOAT),
            ])
        })
        .collect()
}

/// Points from an array of `[x, y]`.
pub fn array_to_points(a: Array, what: &str) -> RhaiResult<Vec<Point>> {
    a.into_iter()
        .enumerate()
        .map(|(i, p)| {
            let xy: Option<Vec<FLOAT>> = p.into_array().ok().and_then(|xy| {
                xy.iter()
                    .map(|v| {
                        v.as_float()
                            .ok()
                            .or_else(|| v.as_int().ok().map(|i| i as FLOAT))
                    })
                    .collect()
            });
            match xy.as_deref() {
                // Points are f32: a coordinate past its range would become an infinity.
                Some([x, y]) if [x, y].iter().all(|v| v.abs() <= f32::MAX as FLOAT) => {
                    Ok([*x as f32, *y as f32])
                }
                Some([x, y]) => Err(err(format!(
                    "{what}: element {i}, [{}, {}], is not a pair of finite numbers within ±{:e}",
                    crate::util::plot::number_text(*x),
                    crate::util::plot::number_text(*y),
                    f32::MAX
                ))),
                _ => Err(err(format!("{what}: element {i} is not a point [x, y]"))),
            }
        })
        .collect()
}

fn toy_model_spec() -> FnSpec {
    FnSpec::new("toy_model")
        .sig("toy_model(options) -> Toy")
        .doc("A toy foundation model of 2-D points (the paper's section 3): trained on its true distribution (four Gaussian peaks, one per concept; or one concept over a 5x5 grid of diversities), or read from `path`. Training takes tens of seconds on a CPU.")
        .opt("layout", Kind::Choice(&Layout::NAMES), "four_peaks", "four_peaks (figure 5) or grid25 (figure 6)")
        .opt("seed", Kind::SEED, 0 as INT, "seed of the initial weights and every training draw")
        .opt_unset("train_steps", Kind::POSITIVE, "training steps (default: four_peaks 2000, grid25 4000)")
        .opt_unset("path", Kind::Str, "read a toy saved by toy.save instead of training (its layout must be `layout`)")
        .example("let toy = toy_model(#{layout: \"four_peaks\"}); toy.save(\"four.safetensors\");")
}

fn customize_spec() -> FnSpec {
    FnSpec::method("Toy", "customize")
        .sig("toy.customize(options) -> ToyCustom")
        .doc("Customizes the toy towards a short line under its concept's peak (the grid: under `diversities` of its 25 peaks) by full fine-tuning (DreamBooth-like), Infusion (C uses F's attention probabilities and adds a trained residual to the concept token's value) or Textual Inversion (a trained token embedding). Returns the last step; c.at(step) gives a snapshot.")
        .opt("method", Kind::Choice(&ToyMethod::NAMES), "full", "full, infusion or textual_inversion")
        .opt("target", Kind::Choice(&["line"]), "line", "what the customization data is: a line under the peak(s)")
        .opt("concept", Kind::Other("an index or a name"), 0 as INT, "the concept customized")
        .opt("diversities", Kind::Int { min: 1, max: 25 }, 5 as INT, "grid25: how many diversities the data shows")
        .opt("train_steps", Kind::POSITIVE, 400 as INT, "customization steps")
        .opt_unset("lr", Kind::Float, "AdamW's peak rate (default: full 1e-3, infusion and textual_inversion 1e-2)")
        .opt("seed", Kind::SEED, 0 as INT, "seed of the training draws")
        .opt_unset("snapshots", Kind::Other("an array of steps"), "steps to keep a snapshot at (0: the foundation); the last step is always kept")
        .example("let c = toy.customize(#{method: \"infusion\", snapshots: [0, 100, 200]}); let early = c.at(100);")
}

fn train_or_load(session: &Session, spec: &FnSpec, o: &Map) -> RhaiResult<ToyVal> {
    let o = Opts::of(o, spec)?;
    let layout = rt(Layout::parse(
        &o.string("layout").unwrap_or_else(|| "four_peaks".into()),
    ))?;
    if let Some(path) = o.string("path") {
        return Ok(ToyVal(Arc::new(rt(Toy::load(
            Path::new(&path),
            Some(layout),
        ))?)));
    }
    let mut opts = ToyTrainOptions::for_layout(layout);
    opts.seed = o.u64("seed").unwrap_or(0);
    if let Some(s) = o.usize("train_steps") {
        opts.steps = s;
    }
    session.job.reset();
    Ok(ToyVal(Arc::new(rt(Toy::train(
        layout,
        &opts,
        &session.job,
    ))?)))
}

fn run_customize(session: &Session, spec: &FnSpec, toy: &ToyVal, o: &Map) -> RhaiResult<CustomVal> {
    let o = Opts::of(o, spec)?;
    let snapshots = match o.get("snapshots") {
        Some(v) => v
            .into_array()
            .map_err(|t| err(format!("snapshots: an array of steps, not {t}")))?
            .into_iter()
            .map(|s| match s.as_int() {
                Ok(i) if i >= 0 => Ok(i as usize),
                _ => Err(err("snapshots: each a step, 0 or more")),
            })
            .collect::<RhaiResult<Vec<_>>>()?,
        None => vec![],
    };
    let opts = CustomizeOptions {
        method: rt(ToyMethod::parse(
            &o.string("method").unwrap_or_else(|| "full".into()),
        ))?,
        concept: concept_arg(&toy.0, &o.get("concept").unwrap_or(Dynamic::from(0 as INT)))?,
        diversities: o.usize("diversities").unwrap_or(5),
        steps: o.usize("train_steps").unwrap_or(400),
        lr: o.float("lr"),
        seed: o.u64("seed").unwrap_or(0),
        snapshots,
        ..Default::default()
    };
    session.job.reset();
    let run = rt(customize(&toy.0, &opts, &session.job))?;
    Ok(CustomVal {
        toy: toy.0.clone(),
        step: run.last.step,
        run: Arc::new(run),
    })
}

/// `toy.sample` / `c.sample`: `n` points of `concept`'s prompt.
fn sample(
    spec: &FnSpec,
    toy: &Toy,
    custom: Option<&Customization>,
    concept: &Dynamic,
    n: INT,
    o: &Map,
) -> RhaiResult<Array> {
    let o = Opts::of(o, spec)?;
    let c = concept_arg(toy, concept)?;
    if n < 1 {
        return Err(err(format!("n = {n}: at least 1 point")));
    }
    let (seed, diversity) = (o.u64("seed").unwrap_or(0), o.usize("diversity"));
    Ok(points_to_array(&rt(
        toy.sample(custom, c, diversity, n as usize, seed)
    )?))
}

fn register_types(api: &mut Api) {
    api.ty::<ToyVal>("Toy", "a toy foundation model of 2-D points (toy_model)");
    api.ty::<CustomVal>(
        "ToyCustom",
        "a customized toy at one snapshot (toy.customize, c.at)",
    );
    api.get(
        ("Toy", "layout", "string"),
        "four_peaks or grid25",
        |t: &mut ToyVal| t.0.layout.name().to_string(),
    );
    api.get(
        ("Toy", "concepts", "array"),
        "the concepts' names, in index order",
        |t: &mut ToyVal| {
            t.0.layout
                .concepts()
                .into_iter()
                .map(|c| Dynamic::from(c.to_string()))
                .collect::<Array>()
        },
    );
    api.get(
        ("ToyCustom", "method", "string"),
        "full, infusion or textual_inversion",
        |c: &mut CustomVal| c.run.last.method.name().to_string(),
    );
    api.get(
        ("ToyCustom", "step", "int"),
        "the training step of this snapshot",
        |c: &mut CustomVal| c.step as INT,
    );
    api.get(
        ("ToyCustom", "steps", "array"),
        "the steps it has snapshots at (the last included)",
        |c: &mut CustomVal| {
            c.run
                .snapshots
                .iter()
                .map(|s| s.step)
                .chain([c.run.last.step])
                .map(|s| Dynamic::from(s as INT))
                .collect::<Array>()
        },
    );
    api.get(
        ("ToyCustom", "losses", "array"),
        "each training step's loss",
        |c: &mut CustomVal| {
            c.run
                .losses
                .iter()
                .map(|&l| Dynamic::from(l as FLOAT))
                .collect::<Array>()
        },
    );
}

fn register_models(api: &mut Api, session: &Arc<Session>) {
    let spec = api.declare(toy_model_spec());
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move |o: Map| train_or_load(&s, &sp, &o));
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move || train_or_load(&s, &sp, &Map::new()));

    let spec = api.declare(
        FnSpec::method("Toy", "save")
            .sig("toy.save(path) -> string")
            .doc("Writes the toy foundation (safetensors, its layout in the metadata); returns the path.")
            .example("toy.save(\"four.safetensors\");"),
    );
    api.func(&spec, |t: &mut ToyVal, path: &str| -> RhaiResult<String> {
        rt(t.0.save(Path::new(path)))?;
        Ok(path.to_string())
    });

    let spec = api.declare(customize_spec());
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move |t: &mut ToyVal, o: Map| {
        run_customize(&s, &sp, t, &o)
    });
    let (s, sp) = (session.clone(), spec.clone());
    api.func(&spec, move |t: &mut ToyVal| {
        run_customize(&s, &sp, t, &Map::new())
    });

    let spec = api.declare(
        FnSpec::method("ToyCustom", "at")
            .sig("c.at(step) -> ToyCustom")
            .doc("The customization as it was at a snapshot step (one of c.steps).")
            .example("let early = c.at(100);"),
    );
    api.func(
        &spec,
        |c: &mut CustomVal, step: INT| -> RhaiResult<CustomVal> {
            let step = usize::try_from(step).map_err(|_| err(format!("step {step}: 0 or more")))?;
            let out = CustomVal { step, ..c.clone() };
            out.custom()?;
            Ok(out)
        },
    );
}

fn register_sampling(api: &mut Api) {
    for receiver in ["Toy", "ToyCustom"] {
        let spec = api.declare(
            FnSpec::method(receiver, "sample")
                .sig(if receiver == "Toy" { "toy.sample(concept, n) -> array" } else { "c.sample(concept, n) -> array" })
                .sig(if receiver == "Toy" { "toy.sample(concept, n, options) -> array" } else { "c.sample(concept, n, options) -> array" })
                .doc("`n` points [x, y] of a concept's prompt (by index or name; 50 DDIM steps from seeded noise). A customized toy changes only its own concept's prompt, except under full fine-tuning.")
                .opt("seed", Kind::SEED, 0 as INT, "seed of the starting noise")
                .opt_unset("diversity", Kind::COUNT, "grid25: the prompt names this diversity (0-24) too")
                .example("let pts = toy.sample(\"top_left\", 500, #{seed: 1});"),
        );
        let (s1, s2) = (spec.clone(), spec.clone());
        if receiver == "Toy" {
            api.func(&spec, move |t: &mut ToyVal, c: Dynamic, n: INT| {
                sample(&s1, &t.0, None, &c, n, &Map::new())
            });
            api.func(&spec, move |t: &mut ToyVal, c: Dynamic, n: INT, o: Map| {
                sample(&s2, &t.0, None, &c, n, &o)
            });
        } else {
            api.func(&spec, move |x: &mut CustomVal, c: Dynamic, n: INT| {
                sample(&s1, &x.toy, Some(x.custom()?), &c, n, &Map::new())
            });
            api.func(
                &spec,
                move |x: &mut CustomVal, c: Dynamic, n: INT, o: Map| {
                    sample(&s2, &x.toy, Some(x.custom()?), &c, n, &o)
                },
            );
        }
    }
}

fn toy_fisher(
    spec: &FnSpec,
    toy: &ToyVal,
    c: &CustomVal,
    concepts: Dynamic,
    o: &Map,
) -> RhaiResult<Map> {
    let o = Opts::of(o, spec)?;
    let list = match concepts.clone().into_array() {
        Ok(a) => a,
        Err(_) => vec![concepts],
    };
    let concepts = list
        .iter()
        .map(|v| concept_arg(&toy.0, v))
        .collect::<RhaiResult<Vec<_>>>()?;
    if !Arc::ptr_eq(&toy.0, &c.toy) {
        return Err(err("toy_fisher: the customization is of another toy"));
    }
    let (mean, se) = rt(fisher(
        &toy.0,
        c.custom()?,
        &concepts,
        o.usize("samples").unwrap_or(1000),
        o.u64("seed").unwrap_or(0),
    ))?;
    let mut m = Map::new();
    m.insert("mean".into(), Dynamic::from(mean as FLOAT));
    m.insert("std_err".into(), Dynamic::from(se as FLOAT));
    Ok(m)
}

/// The Gaussian W2 of two point sets (metrics::w2).
/// The largest coordinate `toy_w2(.., #{exact: true})` takes: squared distances of points within
/// it, in the matching's 1e-9 units, stay well inside an i64.
const EXACT_MAX: f32 = 1e4;

fn gaussian_w2(a: Array, b: Array) -> RhaiResult<FLOAT> {
    let t = |p: Vec<Point>| -> RhaiResult<candle_core::Tensor> {
        let n = p.len();
        rt(candle_core::Tensor::from_vec(
            p.into_iter().flatten().collect::<Vec<f32>>(),
            (n, 2),
            &candle_core::Device::Cpu,
        )
        .map_err(Into::into))
    };
    let (a, b) = (
        t(array_to_points(a, "points_a")?)?,
        t(array_to_points(b, "points_b")?)?,
    );
    Ok(rt(crate::metrics::w2::wasserstein(&a, &b, None))?.w2)
}

fn register_measures(api: &mut Api) {
    let spec = api.declare(
        FnSpec::new("toy_fisher")
            .sig("toy_fisher(toy, c, concepts) -> map")
            .sig("toy_fisher(toy, c, concepts, options) -> map")
            .doc("The latent Fisher divergence (the paper's Definition 3.1) between the foundation and a customization of it on these concepts' prompts: the mean over `samples` draws of 1/2 ||eps_base - eps_custom||^2 (points from the foundation's own samples, noised at uniform timesteps). Returns #{mean, std_err}.")
            .opt("samples", Kind::Int { min: 2, max: INT::MAX }, 1000 as INT, "Monte-Carlo draws")
            .opt("seed", Kind::SEED, 0 as INT, "seed of the draws")
            .example("let f = toy_fisher(toy, c, [1, 2, 3]); print(`${f.mean} ± ${f.std_err}`);"),
    );
    let sp = spec.clone();
    api.func(&spec, move |t: ToyVal, c: CustomVal, concepts: Dynamic| {
        toy_fisher(&sp, &t, &c, concepts, &Map::new())
    });
    let sp = spec.clone();
    api.func(
        &spec,
        move |t: ToyVal, c: CustomVal, concepts: Dynamic, o: Map| {
            toy_fisher(&sp, &t, &c, concepts, &o)
        },
    );

    let spec = api.declare(
        FnSpec::new("toy_w2")
            .sig("toy_w2(points_a, points_b) -> float")
            .sig("toy_w2(points_a, points_b, options) -> float")
            .doc("The 2-Wasserstein distance between Gaussians fitted to two point sets (as the paper's Definition 3.2 is computed, see wasserstein); with exact: true, the exact W2 of two equal-size sets (the optimal one-to-one matching, O(n^3): a few hundred points).")
            .opt("exact", Kind::Bool, false, "the exact empirical W2 instead of the Gaussian fit")
            .example("let d = toy_w2(toy.sample(0, 500), c.sample(0, 500));"),
    );
    let sp = spec.clone();
    api.func(
        &spec,
        move |a: Array, b: Array, o: Map| -> RhaiResult<FLOAT> {
            let o = Opts::of(&o, &sp)?;
            if o.bool("exact").unwrap_or(false) {
                let (a, b) = (array_to_points(a, "points_a")?, array_to_points(b, "points_b")?);
                // The matching counts squared distances in 1e-9 units as 64-bit integers:
                // farther points would overflow them.
                if let Some(p) = a.iter().chain(&b).find(|p| p.iter().any(|v| v.abs() > EXACT_MAX)) {
                    return Err(err(format!(
                        "toy_w2: exact: [{}, {}] is farther out than ±{EXACT_MAX} (the exact matching's limit)",
                        p[0], p[1]
                    )));
                }
                return rt(crate::toy::exact_w2(&a, &b));
            }
            gaussian_w2(a, b)
        },
    );
    api.func(&spec, gaussian_w2);

    let spec = api.declare(
        FnSpec::new("toy_modes")
            .sig("toy_modes(toy_or_c, concept) -> int")
            .sig("toy_modes(toy_or_c, concept, options) -> int")
            .doc("How many of a concept's diversities (its peaks) the model's samples of its bare prompt still cover: a peak counts when at least 1% of `n` samples fall within 3 standard deviations of it.")
            .opt("n", Kind::POSITIVE, 1000 as INT, "samples drawn")
            .opt("seed", Kind::SEED, 0 as INT, "seed of the samples")
            .example("print(toy_modes(grid, 0)); print(toy_modes(c, 0));"),
    );
    let modes = |spec: &FnSpec,
                 toy: &Toy,
                 custom: Option<&Customization>,
                 concept: Dynamic,
                 o: &Map|
     -> RhaiResult<INT> {
        let o = Opts::of(o, spec)?;
        let c = concept_arg(toy, &concept)?;
        let points = rt(toy.sample(
            custom,
            c,
            None,
            o.usize("n").unwrap_or(1000),
            o.u64("seed").unwrap_or(0),
        ))?;
        Ok(count_modes(&points, &toy.layout.peaks(c), toy.layout.std()) as INT)
    };
    let sp = spec.clone();
    api.func(&spec, move |t: ToyVal, c: Dynamic| {
        modes(&sp, &t.0, None, c, &Map::new())
    });
    let sp = spec.clone();
    api.func(&spec, move |t: ToyVal, c: Dynamic, o: Map| {
        modes(&sp, &t.0, None, c, &o)
    });
    let sp = spec.clone();
    api.func(&spec, move |x: CustomVal, c: Dynamic| {
        modes(&sp, &x.toy, Some(x.custom()?), c, &Map::new())
    });
    let sp = spec.clone();
    api.func(&spec, move |x: CustomVal, c: Dynamic, o: Map| {
        modes(&sp, &x.toy, Some(x.custom()?), c, &o)
    });
}

pub fn register(api: &mut Api, session: &Arc<Session>) {
    register_types(api);
    register_models(api, session);
    register_sampling(api);
    register_measures(api);
}
