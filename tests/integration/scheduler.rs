//! DDIM parity (reference/ddim.json): alphas_cumprod to 1e-6 relative, timesteps exact.

use infusion_repl::sd::{Plan, SamplerOptions};

use crate::common::{repo, tiny};

#[derive(serde::Deserialize)]
struct Ddim {
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    timesteps_50: Vec<usize>,
    timesteps_5: Vec<usize>,
}

fn reference() -> Ddim {
    let p = repo().join("tests/fixtures/reference/ddim.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

#[test]
fn alphas_cumprod_match() {
    let r = reference();
    let s = &tiny().scheduler;
    assert_eq!(s.alphas_cumprod().len(), r.alphas_cumprod.len());
    for (i, (&a, &b)) in s.alphas_cumprod().iter().zip(&r.alphas_cumprod).enumerate() {
        let rel = ((a as f64 - b) / b).abs();
        assert!(rel <= 1e-6, "alphas_cumprod[{i}]: {a} vs {b} (rel {rel:e})");
    }
    let f = s.final_alpha_cumprod() as f64;
    assert!(((f - r.final_alpha_cumprod) / r.final_alpha_cumprod).abs() <= 1e-6);
}

#[test]
fn leading_timesteps_match() {
    let r = reference();
    let s = &tiny().scheduler;
    let ddim = |steps| -> Vec<usize> {
        let plan = Plan::new(s, SamplerOptions::default(), steps).unwrap();
        plan.timesteps().iter().map(|&t| t as usize).collect()
    };
    assert_eq!(ddim(50), r.timesteps_50);
    assert_eq!(ddim(5), r.timesteps_5);
}
