//! Every sampler's contract, and the samplers against diffusers (reference/samplers.safetensors
//! and reference/schedules.json, made by tools/make_sampler_fixtures.py with diffusers 0.42.1 on
//! the bundled tiny model), as diffusers' `SchedulerCommonTest` holds its schedulers:
//! - the contract, for every registered sampler (with and without Karras sigmas where offered)
//!   and every timestep_spacing: timesteps non-increasing and inside the training schedule,
//!   the calls a run of n steps makes, sigmas ending at 0, a trajectory driven by the exact
//!   noise prediction of one known clean sample ending at that sample (1e-5 absolute; 1e-6 is
//!   what they reach in f32), trajectories stepped side by side keeping their own state (bit for
//!   bit), and a diffusers fixture for each;
//! - every sampler's 5-step text-to-image trajectory: the UNet's timestep at each call (1e-3
//!   absolute: Euler with Karras sigmas has fractional ones, where one ulp of f32 log differs by
//!   ~1e-4), the latents after every call and the final latents within the txt2img tolerance,
//!   1e-3 relative;
//! - every sampler's schedule for each timestep_spacing at 5, 20 and 50 steps: timesteps (1e-3
//!   absolute), sigmas (1e-5 relative) and the initial noise scale (1e-5 relative), no model
//!   involved;
//! - F and C share a noise-adding sampler's per-step noise, different samples do not.

use std::collections::HashMap;

use candle_core::Tensor;
use infusion_repl::sd::NoiseSchedule;
use infusion_repl::sd::{Denoise, Trajectory};
use infusion_repl::sd::{Plan, SamplerKind, SamplerOptions};
use infusion_repl::sd::{SchedulerConfig, TimestepSpacing};
use infusion_repl::{Branch, GenerateOptions, Job, StableDiffusion};

use crate::common::{assert_close, get, max_abs, reference, repo, tiny, tiny_model_dir};

const PROMPT: &str = "a photo of a cat sitting by a teapot";

/// Our options for a fixture's sampler name: a sampler's name, `NAME_karras`, or `pndm_plms`
/// (PNDM under a config that skips the Runge-Kutta warm-up).
fn options(name: &str) -> SamplerOptions {
    match name {
        "pndm_plms" => SamplerOptions::parse("pndm", false),
        other => match other.strip_suffix("_karras") {
            Some(base) => SamplerOptions::parse(base, true),
            None => SamplerOptions::parse(other, false),
        },
    }
    .unwrap()
}

/// The fixture names of every registered sampler: its name, and `NAME_karras` where it takes
/// Karras sigmas.
fn fixture_names() -> Vec<String> {
    SamplerKind::all()
        .flat_map(|k| {
            let karras = k.offers_karras().then(|| format!("{}_karras", k.name()));
            std::iter::once(k.name().to_string()).chain(karras)
        })
        .collect()
}

fn trajectories(sd: &StableDiffusion, branches: &[(Branch, usize)]) -> Vec<Trajectory> {
    let states = sd
        .text_states(&[&sd.tokenize("").unwrap(), &sd.tokenize(PROMPT).unwrap()])
        .unwrap();
    branches
        .iter()
        .map(|&(branch, sample)| Trajectory {
            branch,
            sample,
            uncond: states.get(0).unwrap().unsqueeze(0).unwrap(),
            cond: states.get(1).unwrap().unsqueeze(0).unwrap(),
        })
        .collect()
}

fn check_trajectory(sd: &StableDiffusion, r: &HashMap<String, Tensor>, name: &str) {
    let mut opts = GenerateOptions {
        steps: 5,
        guidance: 7.5,
        sampler: options(name),
        noise: Some(get(r, "init_noise").clone()),
        ..Default::default()
    };
    let noise = r.get(&format!("{name}.step_noise"));
    assert_eq!(
        noise.is_some(),
        opts.sampler.kind.needs_noise(),
        "{name}: diffusers drew step noise iff our sampler needs it"
    );
    opts.step_noise = noise.cloned();
    let init = sd.initial_latents(&opts).unwrap();
    let (mut timesteps, mut latents) = (vec![], vec![]);
    let fin = sd
        .denoise(
            &Denoise::new(&init, &trajectories(sd, &[(Branch::MAIN, 0)]), &opts),
            &Job::quiet(),
            &mut |rep| {
                timesteps.push(rep.step.timestep as f32);
                latents.push(rep.latents[0].clone());
                Ok(())
            },
        )
        .unwrap()
        .remove(0);
    let expected = get(r, &format!("{name}.timesteps"))
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(
        timesteps.len(),
        expected.len(),
        "{name}: number of UNet calls"
    );
    for (i, (a, b)) in timesteps.iter().zip(&expected).enumerate() {
        assert!((a - b).abs() <= 1e-3, "{name}: timestep {i}: {a} vs {b}");
    }
    let latents = Tensor::cat(&latents, 0).unwrap();
    assert_close(
        &latents,
        get(r, &format!("{name}.latents_steps")),
        1e-3,
        &format!("{name}: latents after each call"),
    );
    assert_close(
        &fin,
        get(r, &format!("{name}.final_latents")),
        1e-3,
        &format!("{name}: final latents"),
    );
}

#[test]
fn every_sampler_matches_diffusers_on_the_tiny_model() {
    let r = reference("samplers.safetensors");
    for name in fixture_names() {
        assert!(
            r.contains_key(&format!("{name}.final_latents")),
            "{name}: no diffusers trajectory in reference/samplers.safetensors (add the sampler \
             to tools/make_sampler_fixtures.py)"
        );
        check_trajectory(tiny(), &r, &name);
    }
}

#[test]
fn pndm_without_runge_kutta_warm_up_matches_diffusers() {
    // SD1.5's own scheduler config skips PNDM's Runge-Kutta steps; the tiny model's does not.
    let mut sd = StableDiffusion::load_dir(&tiny_model_dir(), &Default::default()).unwrap();
    let mut cfg = sd.scheduler.config().clone();
    cfg.skip_prk_steps = true;
    sd.scheduler = NoiseSchedule::new(&cfg);
    check_trajectory(&sd, &reference("samplers.safetensors"), "pndm_plms");
}

#[derive(serde::Deserialize)]
struct Schedule {
    timesteps: Vec<f64>,
    sigmas: Option<Vec<f64>>,
    init_noise_sigma: f64,
}

#[derive(serde::Deserialize)]
struct Schedules {
    schedules: HashMap<String, Schedule>,
}

#[test]
fn schedules_match_diffusers_for_every_spacing() {
    let path = repo().join("tests/fixtures/reference/schedules.json");
    let table: Schedules = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut names = fixture_names();
    names.push("pndm_plms".into());
    assert_eq!(table.schedules.len(), names.len() * 3 * 3);
    let base = tiny().scheduler.config().clone();
    for (key, want) in &table.schedules {
        let parts: Vec<&str> = key.split('/').collect();
        let (name, spacing, steps) = (parts[0], parts[1], parts[2].parse::<usize>().unwrap());
        let mut cfg: SchedulerConfig = base.clone();
        cfg.timestep_spacing = spacing.parse().unwrap();
        cfg.skip_prk_steps = name == "pndm_plms";
        let schedule = NoiseSchedule::new(&cfg);
        let plan = Plan::new(&schedule, options(name), steps).unwrap();
        assert_eq!(plan.len(), want.timesteps.len(), "{key}: number of calls");
        for (i, (a, b)) in plan.timesteps().iter().zip(&want.timesteps).enumerate() {
            assert!((a - b).abs() <= 1e-3, "{key}: timestep {i}: {a} vs {b}");
        }
        // Samplers in sigma space: diffusers' sigmas (the others keep theirs, unused, or none).
        if !plan.sigmas().is_empty() {
            let sigmas = want.sigmas.as_ref().expect("diffusers has sigmas too");
            assert_eq!(plan.sigmas().len(), sigmas.len(), "{key}: sigmas");
            for (i, (&a, b)) in plan.sigmas().iter().zip(sigmas).enumerate() {
                let rel = (a as f64 - b).abs() / b.abs().max(1e-12);
                assert!(
                    a as f64 == *b || rel <= 1e-5,
                    "{key}: sigma {i}: {a} vs {b}"
                );
            }
        }
        let rel = (plan.init_noise_sigma() - want.init_noise_sigma).abs() / want.init_noise_sigma;
        assert!(
            rel <= 1e-5,
            "{key}: init noise sigma {} vs {}",
            plan.init_noise_sigma(),
            want.init_noise_sigma
        );
    }
}

/// Denoises `branches` (branch, sample) with `sampler` from the same initial noise.
fn ancestral(sampler: &str, branches: &[(Branch, usize)], seed: u64) -> Vec<Tensor> {
    let sd = tiny();
    let opts = GenerateOptions {
        steps: 4,
        seed,
        sampler: SamplerOptions::parse(sampler, false).unwrap(),
        ..Default::default()
    };
    let init = sd.initial_latents(&opts).unwrap();
    sd.denoise(
        &Denoise::new(&init, &trajectories(sd, branches), &opts),
        &Job::quiet(),
        &mut |_| Ok(()),
    )
    .unwrap()
}

#[test]
fn step_noise_is_shared_by_trajectories_of_one_sample_and_differs_between_samples() {
    let (f, c) = (Branch(0), Branch(1));
    for sampler in SamplerKind::all().filter(|k| k.needs_noise()) {
        let name = sampler.name();
        let out = ancestral(name, &[(f, 0), (c, 0), (f, 1)], 3);
        // Same text, same sample: the same per-step noise, so the same latents bit for bit.
        assert_eq!(max_abs(&(&out[0] - &out[1]).unwrap()), 0.0, "{name}");
        // Another sample index draws other noise.
        assert!(max_abs(&(&out[0] - &out[2]).unwrap()) > 1e-2, "{name}");
        // Deterministic for a seed whatever else is in the batch (to 1e-4: another batch size
        // rounds the UNet's sums differently), and the seed matters.
        let again = ancestral(name, &[(f, 0)], 3);
        assert!(
            max_abs(&(&out[0] - &again[0]).unwrap()) <= 1e-4 * max_abs(&out[0]).max(1.0),
            "{name}"
        );
        let other = ancestral(name, &[(f, 0)], 4);
        assert!(max_abs(&(&out[0] - &other[0]).unwrap()) > 1e-2, "{name}");
    }
}

#[test]
fn bad_sampler_options_are_refused_before_any_work() {
    let sd = tiny();
    let e = SamplerOptions::parse("lms", false).unwrap_err().to_string();
    assert!(
        e.contains("unknown scheduler `lms`") && e.contains("euler_a"),
        "{e}"
    );
    let e = SamplerOptions::parse("euler_a", true)
        .unwrap_err()
        .to_string();
    assert!(e.contains("karras") && e.contains("euler_a"), "{e}");
    // PNDM with its Runge-Kutta warm-up (the tiny config) needs 4 steps.
    let opts = GenerateOptions {
        steps: 3,
        sampler: SamplerOptions::parse("pndm", false).unwrap(),
        ..Default::default()
    };
    let e = sd.check_generate(&opts, 2).unwrap_err().to_string();
    assert!(e.contains("at least 4 steps"), "{e}");
    // Given step noise must have one entry per call.
    let opts = GenerateOptions {
        steps: 5,
        sampler: SamplerOptions::parse("euler_a", false).unwrap(),
        step_noise: Some(
            Tensor::zeros(
                (2, 4, 16, 16),
                candle_core::DType::F32,
                &candle_core::Device::Cpu,
            )
            .unwrap(),
        ),
        ..Default::default()
    };
    let e = sd.check_generate(&opts, 2).unwrap_err().to_string();
    assert!(
        e.contains("step_noise") && e.contains("[5 or more, 4, 16, 16]"),
        "{e}"
    );
}

/// The exact noise prediction at timestep `t` (fractional ones between the schedule's sigmas in
/// log space, as the samplers map them) for the UNet input `input` of a trajectory whose clean
/// sample is `x0`: `(input - sqrt(abar) x0) / sqrt(1 - abar)`.
fn exact_eps(schedule: &NoiseSchedule, t: f64, input: &Tensor, x0: &Tensor) -> Tensor {
    let log: Vec<f64> = schedule.sigmas().iter().map(|&s| (s as f64).ln()).collect();
    let j = (t.floor() as usize).min(log.len() - 2);
    let sigma = (log[j] + (t - j as f64) * (log[j + 1] - log[j])).exp();
    let abar = 1.0 / (1.0 + sigma * sigma);
    ((input - (x0 * abar.sqrt()).unwrap()).unwrap() / (1.0 - abar).sqrt()).unwrap()
}

/// One trajectory of the contract: its clean sample, its initial and per-call noise.
struct Exact {
    x0: Tensor,
    init: Tensor,
    step_noise: Vec<Tensor>,
}

impl Exact {
    fn new(seed: u64, calls: usize) -> Self {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut normal = || {
            infusion_repl::util::normal(&mut rng, &[1, 4, 3, 3], &candle_core::Device::Cpu).unwrap()
        };
        let x0 = (normal() * 0.5).unwrap();
        let init = normal();
        let step_noise = (0..calls).map(|_| normal()).collect();
        Self {
            x0,
            init,
            step_noise,
        }
    }
}

/// Runs the trajectories side by side under `plan`, each with its own state, each call driven
/// by the exact noise prediction; the final samples.
fn run_exact(plan: &Plan, schedule: &NoiseSchedule, runs: &[&Exact]) -> Vec<Tensor> {
    let mut states: Vec<_> = runs.iter().map(|_| plan.state()).collect();
    let mut xs: Vec<Tensor> = runs
        .iter()
        .map(|r| (&r.init * plan.init_noise_sigma()).unwrap())
        .collect();
    for (index, &t) in plan.timesteps().iter().enumerate() {
        for ((x, state), run) in xs.iter_mut().zip(&mut states).zip(runs) {
            let input = plan.scale_input(index, x).unwrap();
            let eps = exact_eps(schedule, t, &input, &run.x0);
            let noise = plan
                .options()
                .kind
                .needs_noise()
                .then_some(&run.step_noise[index]);
            *x = plan.step(state, index, &eps, x, noise).unwrap();
        }
    }
    xs
}

#[test]
fn every_sampler_keeps_the_contract() {
    let base = tiny().scheduler.config().clone();
    let t_total = base.num_train_timesteps as f64;
    let mut worst = 0f32;
    for name in fixture_names().into_iter().chain(["pndm_plms".to_string()]) {
        let options = options(&name);
        for spacing in TimestepSpacing::NAMES {
            for steps in [5, 20, 50] {
                let key = format!("{name}/{spacing}/{steps}");
                let mut cfg: SchedulerConfig = base.clone();
                cfg.timestep_spacing = spacing.parse().unwrap();
                cfg.skip_prk_steps = name == "pndm_plms";
                // DDIM and PNDM end at alpha_cumprod 1 (SD's config stops at alpha_cumprod[0]).
                cfg.set_alpha_to_one = true;
                let schedule = NoiseSchedule::new(&cfg);
                let plan = Plan::new(&schedule, options, steps).unwrap();
                // The calls: one per step, except PNDM's repeated first PLMS call and its
                // Runge-Kutta warm-up (three steps of four calls in place of three).
                let calls = match name.as_str() {
                    "pndm_plms" => steps + 1,
                    "pndm" => steps + 9,
                    _ => steps,
                };
                assert_eq!(plan.len(), calls, "{key}: calls");
                let ts = plan.timesteps();
                assert!(
                    ts.iter().all(|t| (0.0..t_total).contains(t)),
                    "{key}: timesteps outside the schedule: {ts:?}"
                );
                // Non-increasing (PNDM repeats a timestep; its warm-up goes half a step up
                // within each group of four calls, as diffusers'), and the noisiest first.
                if !name.starts_with("pndm") || name == "pndm_plms" {
                    assert!(
                        ts.windows(2).all(|w| w[0] >= w[1]),
                        "{key}: timesteps not descending: {ts:?}"
                    );
                }
                assert_eq!(
                    ts[0],
                    ts.iter().copied().fold(0.0, f64::max),
                    "{key}: first call"
                );
                let sigmas = plan.sigmas();
                if !sigmas.is_empty() {
                    assert_eq!(sigmas.len(), calls + 1, "{key}: sigmas");
                    assert_eq!(sigmas[calls], 0.0, "{key}: final sigma");
                    assert!(
                        sigmas.windows(2).all(|w| w[0] > w[1]),
                        "{key}: sigmas not decreasing: {sigmas:?}"
                    );
                }
                assert!(plan.init_noise_sigma() >= 1.0, "{key}: init noise sigma");
                // The exact noise prediction takes any start to the clean sample.
                let (a, b) = (Exact::new(1, calls), Exact::new(2, calls));
                let alone = run_exact(&plan, &schedule, &[&a]).remove(0);
                let err = max_abs(&(&alone - &a.x0).unwrap());
                // diffusers' PNDM steps by T / n whatever the spacing, so under `linspace` it
                // does not reach the clean sample (0.69 away in diffusers itself); we follow it.
                if !(name.starts_with("pndm") && *spacing == "linspace") {
                    worst = worst.max(err);
                    assert!(err <= 1e-5, "{key}: ends {err} from the clean sample");
                }
                // Side by side, each trajectory keeps its own state: bit for bit as alone.
                let both = run_exact(&plan, &schedule, &[&b, &a]);
                assert_eq!(
                    max_abs(&(&both[1] - &alone).unwrap()),
                    0.0,
                    "{key}: a trajectory stepped beside another"
                );
            }
        }
    }
    eprintln!("worst distance from the clean sample: {worst}");
}
