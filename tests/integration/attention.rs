//! The attention hook: reading probabilities (reference/attention.safetensors), and making the
//! Infusion computations of reference/infusion.safetensors and reference/train_grad.safetensors
//! possible, with test-local hooks that follow tests/fixtures/README.md.

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Tensor, Var};
use infusion_repl::sd::{Denoise, Trajectory};
use infusion_repl::{
    AttentionCall, AttentionHook, AttnKind, AttnSite, BatchLayout, Branch, Guidance, HookCtx, Job,
    LayerInfo,
};

use crate::common::{assert_close, get, max_abs, reference, tiny};

/// The rows of the plain (F) and the changed (C) branch, as Infusion tags them.
const F: Branch = Branch(0);
const C: Branch = Branch(1);

const PROMPT: &str = "a photo of a cat sitting by a teapot";

fn is_cross(l: &LayerInfo) -> bool {
    l.kind == AttnKind::CrossAttention
}

/// Records the probabilities of one row in every cross-attention layer at one step.
struct Capture {
    step: usize,
    branch: Branch,
    maps: Mutex<HashMap<String, Tensor>>,
}

impl AttentionHook for Capture {
    fn wants(&self, layer: &LayerInfo) -> bool {
        is_cross(layer)
    }
    fn attend(&self, site: &AttnSite<'_>, call: &mut AttentionCall) -> candle_core::Result<()> {
        if site.step.map(|s| s.index) == Some(self.step) {
            let row = site
                .rows
                .find(self.branch, Guidance::Conditional, 0)
                .unwrap();
            let p = call.probs(row)?;
            self.maps.lock().unwrap().insert(site.layer.path.clone(), p);
        }
        Ok(())
    }
}

fn text_trajectories(branches: &[Branch]) -> Vec<Trajectory> {
    let sd = tiny();
    let neg = sd.tokenize("").unwrap();
    let pos = sd.tokenize(PROMPT).unwrap();
    let states = sd.text_states(&[&neg, &pos]).unwrap();
    branches
        .iter()
        .map(|&branch| Trajectory {
            branch,
            sample: 0,
            uncond: states.get(0).unwrap().unsqueeze(0).unwrap(),
            cond: states.get(1).unwrap().unsqueeze(0).unwrap(),
        })
        .collect()
}

/// The first step's cross-attention probabilities of the 5-step schedule (t=801) match
/// reference/attention.safetensors within 1e-4 relative, and each row sums to one within 1e-5.
/// The run is stopped by its progress callback after step 0: it must end with
/// `Error::Cancelled` (the callback's error passed through, not a result or another error), and
/// the hook must have seen exactly the reference's layers.
#[test]
fn first_step_cross_attention_probabilities_match_reference() {
    let r = reference("attention.safetensors");
    let init = get(&reference("txt2img.safetensors"), "init_noise").clone();
    // Run the 5-step schedule (first step t=801) and stop after its first step.
    let hook5 = Capture {
        step: 0,
        branch: F,
        maps: Mutex::new(HashMap::new()),
    };
    let run = tiny().denoise(
        &Denoise::new(
            &init,
            &text_trajectories(&[F]),
            &infusion_repl::GenerateOptions {
                steps: 5,
                guidance: 7.5,
                ..Default::default()
            },
        )
        .hook(Some(&hook5)),
        &Job::quiet(),
        &mut |rep| {
            if rep.step.index == 0 {
                Err(infusion_repl::Error::Cancelled)
            } else {
                Ok(())
            }
        },
    );
    assert!(
        matches!(run, Err(infusion_repl::Error::Cancelled)),
        "a run stopped after its first step must end Cancelled, got {:?}",
        run.map(|l| l.len())
    );
    let maps = hook5.maps.into_inner().unwrap();
    assert_eq!(maps.len(), r.len());
    for (path, expected) in &r {
        let got = maps
            .get(path)
            .unwrap_or_else(|| panic!("no map for {path}"));
        assert_close(got, expected, 1e-4, path);
        // rows sum to one
        let sums = got.sum(2).unwrap();
        let ones = sums.ones_like().unwrap();
        assert_close(&sums, &ones, 1e-5, "row sums");
    }
}

/// A hook that wants every layer, reads every row and changes nothing.
struct Observer;

impl AttentionHook for Observer {
    fn wants(&self, _: &LayerInfo) -> bool {
        true
    }
    fn attend(&self, site: &AttnSite<'_>, call: &mut AttentionCall) -> candle_core::Result<()> {
        for row in 0..site.rows.len() {
            call.probs(row)?;
        }
        Ok(())
    }
}

#[test]
fn observing_hook_changes_nothing() {
    let r = reference("unet.safetensors");
    let t = get(&r, "timesteps").to_dtype(DType::F32).unwrap();
    let unet = &tiny().unet;
    let (x, ctx) = (get(&r, "sample"), get(&r, "encoder_hidden_states"));
    let plain = unet.forward(x, &t, ctx, None).unwrap();
    let rows = BatchLayout::cfg(F);
    let hook = HookCtx {
        hook: &Observer,
        rows: &rows,
        step: None,
    };
    let hooked = unet.forward(x, &t, ctx, Some(&hook)).unwrap();
    // On the CPU in f32 the plain run takes the blocked attention kernel and the hooked one
    // its two halves (probabilities, then the mix) with the same blocks: bit for bit.
    assert_eq!(max_abs(&(&plain - &hooked).unwrap()), 0.0);
}

#[test]
fn a_layout_that_does_not_fit_the_batch_is_an_error() {
    let r = reference("unet.safetensors");
    let t = get(&r, "timesteps").to_dtype(DType::F32).unwrap();
    let rows = BatchLayout::uniform(3, F, Guidance::Conditional);
    let hook = HookCtx {
        hook: &Observer,
        rows: &rows,
        step: None,
    };
    let e = tiny()
        .unet
        .forward(
            get(&r, "sample"),
            &t,
            get(&r, "encoder_hidden_states"),
            Some(&hook),
        )
        .expect_err("a 3-row layout for a batch of 2 is refused");
    assert!(e.to_string().contains("3 rows"), "{e}");
}

/// Adds `delta[layer]` to the values of `positions` in rows picked by `rows_of`.
fn add_deltas(
    call: &mut AttentionCall,
    rows: &[usize],
    concepts: &[(&HashMap<String, Tensor>, &[usize])],
    layer: &str,
) -> candle_core::Result<()> {
    let v = call.values().clone();
    let (b, m, inner) = v.dims3()?;
    let mut add = Tensor::zeros((b, m, inner), v.dtype(), v.device())?;
    for (deltas, positions) in concepts {
        let delta = &deltas[layer];
        let mut mask = vec![0f32; b * m];
        for &r in rows {
            for &k in positions.iter() {
                mask[r * m + k] = 1.0;
            }
        }
        let mask = Tensor::from_vec(mask, (b, m, 1), v.device())?.to_dtype(v.dtype())?;
        add = (add + mask.broadcast_mul(&delta.reshape((1, 1, inner))?)?)?;
    }
    call.set_values((v + add)?)
}

/// Infusion in one batched call: cond_C reuses cond_F's probabilities and adds the deltas.
struct Infusion<'a> {
    concepts: Vec<(&'a HashMap<String, Tensor>, &'a [usize])>,
}

impl AttentionHook for Infusion<'_> {
    fn wants(&self, layer: &LayerInfo) -> bool {
        is_cross(layer)
    }
    fn attend(&self, site: &AttnSite<'_>, call: &mut AttentionCall) -> candle_core::Result<()> {
        let cf = site.rows.find(F, Guidance::Conditional, 0).unwrap();
        let cc = site.rows.find(C, Guidance::Conditional, 0).unwrap();
        call.share_probs(cc, cf)?;
        add_deltas(call, &[cc], &self.concepts, &site.layer.path)
    }
}

fn deltas(r: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tiny()
        .unet
        .attention_layers()
        .into_iter()
        .filter(|l| is_cross(l))
        .map(|l| {
            (
                l.path.clone(),
                get(r, &format!("{prefix}{}", l.path)).clone(),
            )
        })
        .collect()
}

fn run_infusion(
    r: &HashMap<String, Tensor>,
    concepts: Vec<(&HashMap<String, Tensor>, &[usize])>,
) -> (Tensor, Vec<Tensor>, Vec<Tensor>, Vec<Tensor>) {
    let hook = Infusion { concepts };
    let mut unet0 = None;
    let mut f_steps = vec![];
    let mut c_steps = vec![];
    let fin = tiny()
        .denoise(
            &Denoise::new(
                get(r, "init_noise"),
                &text_trajectories(&[F, C]),
                &infusion_repl::GenerateOptions {
                    steps: 5,
                    guidance: 7.5,
                    ..Default::default()
                },
            )
            .hook(Some(&hook)),
            &Job::quiet(),
            &mut |rep| {
                if rep.step.index == 0 {
                    unet0 = Some(rep.unet_out.clone());
                }
                f_steps.push(rep.latents[0].clone());
                c_steps.push(rep.latents[1].clone());
                Ok(())
            },
        )
        .unwrap();
    (unet0.unwrap(), f_steps, c_steps, fin)
}

#[test]
fn infusion_hook_reproduces_reference_single_and_multi_concept() {
    let r = reference("infusion.safetensors");
    let pos1: Vec<usize> = get(&r, "concept1_token_indices")
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let pos2: Vec<usize> = get(&r, "concept2_token_indices")
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let d1 = deltas(&r, "");
    let d2 = deltas(&r, "concept2.");

    let (unet0, f, c, fin) = run_infusion(&r, vec![(&d1, &pos1)]);
    assert_close(
        &unet0,
        get(&r, "step0_unet_out"),
        1e-4,
        "step 0 UNet output [uF, cF, uC, cC]",
    );
    let cat = |v: &[Tensor]| Tensor::cat(v, 0).unwrap();
    assert_close(&cat(&f), get(&r, "F_latents_steps"), 1e-3, "F latents");
    assert_close(&cat(&c), get(&r, "C_latents_steps"), 1e-3, "C latents");
    assert_close(&fin[1], get(&r, "final_C_latents"), 1e-3, "final C latents");
    assert_close(&fin[0], get(&r, "final_F_latents"), 1e-3, "final F latents");

    let (_, _, c, _) = run_infusion(&r, vec![(&d1, &pos1), (&d2, &pos2)]);
    assert_close(
        &cat(&c),
        get(&r, "multi_C_latents_steps"),
        1e-3,
        "multi-concept C latents",
    );
}

#[test]
fn zero_deltas_give_c_equal_to_f_bit_for_bit() {
    let r = reference("infusion.safetensors");
    let zeros: HashMap<String, Tensor> = deltas(&r, "")
        .into_iter()
        .map(|(k, v)| (k, v.zeros_like().unwrap()))
        .collect();
    let (unet0, f, c, _) = run_infusion(&r, vec![(&zeros, &[5])]);
    for (i, (a, b)) in f.iter().zip(&c).enumerate() {
        assert_eq!(max_abs(&(a - b).unwrap()), 0.0, "step {i}");
    }
    let rows = |a, n| unet0.narrow(0, a, n).unwrap();
    assert_eq!(max_abs(&(rows(0, 2) - rows(2, 2)).unwrap()), 0.0);
}

/// Training-side use: a C pass that replays recorded F probabilities per row and adds deltas
/// held in `Var`s, for every row.
struct Replay<'a> {
    maps: &'a HashMap<String, Tensor>,
    deltas: &'a HashMap<String, Tensor>,
    positions: &'a [usize],
}

impl AttentionHook for Replay<'_> {
    fn wants(&self, layer: &LayerInfo) -> bool {
        is_cross(layer)
    }
    fn attend(&self, site: &AttnSite<'_>, call: &mut AttentionCall) -> candle_core::Result<()> {
        let maps = &self.maps[&site.layer.path];
        for row in 0..site.rows.len() {
            call.set_probs(row, maps.get(row)?)?;
        }
        let rows: Vec<usize> = (0..site.rows.len()).collect();
        add_deltas(
            call,
            &rows,
            &[(self.deltas, self.positions)],
            &site.layer.path,
        )
    }
}

/// Records every row's probabilities (F pass).
struct Record(Mutex<HashMap<String, Tensor>>);

impl AttentionHook for Record {
    fn wants(&self, layer: &LayerInfo) -> bool {
        is_cross(layer)
    }
    fn attend(&self, site: &AttnSite<'_>, call: &mut AttentionCall) -> candle_core::Result<()> {
        let rows = (0..site.rows.len())
            .map(|r| call.probs(r)?.unsqueeze(0))
            .collect::<candle_core::Result<Vec<_>>>()?;
        self.0
            .lock()
            .unwrap()
            .insert(site.layer.path.clone(), Tensor::cat(&rows, 0)?);
        Ok(())
    }
}

#[test]
fn gradients_through_the_hook_match_reference() {
    let r = reference("train_grad.safetensors");
    let sd = tiny();
    let t = get(&r, "t").to_dtype(DType::F32).unwrap();
    let ts: Vec<usize> = get(&r, "t")
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as usize)
        .collect();
    let z0 = get(&r, "z0");
    let eps = get(&r, "eps");
    let z_t = sd.scheduler.add_noise(z0, eps, &ts).unwrap();
    assert_close(&z_t, get(&r, "z_t"), 1e-5, "z_t");
    let ctx = get(&r, "encoder_hidden_states");
    let rows = BatchLayout::uniform(2, F, Guidance::Conditional);

    let record = Record(Mutex::new(HashMap::new()));
    let eps_f = sd
        .unet
        .forward(
            &z_t,
            &t,
            ctx,
            Some(&HookCtx {
                hook: &record,
                rows: &rows,
                step: None,
            }),
        )
        .unwrap();
    assert_close(&eps_f, get(&r, "eps_F"), 1e-4, "eps_F");
    let maps = record.0.into_inner().unwrap();

    let positions: Vec<usize> = get(&r, "concept_token_indices")
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|i| i as usize)
        .collect();
    let vars: HashMap<String, Var> = deltas(&r, "")
        .into_iter()
        .map(|(k, v)| (k, Var::from_tensor(&v).unwrap()))
        .collect();
    let delta_tensors: HashMap<String, Tensor> = vars
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let replay = Replay {
        maps: &maps,
        deltas: &delta_tensors,
        positions: &positions,
    };
    let rows_c = BatchLayout::uniform(2, C, Guidance::Conditional);
    let eps_c = sd
        .unet
        .forward(
            &z_t,
            &t,
            ctx,
            Some(&HookCtx {
                hook: &replay,
                rows: &rows_c,
                step: None,
            }),
        )
        .unwrap();
    assert_close(&eps_c, get(&r, "eps_C"), 1e-4, "eps_C");
    let loss = (eps - &eps_c).unwrap().sqr().unwrap().mean_all().unwrap();
    assert_close(&loss, get(&r, "loss"), 1e-5, "loss");
    let grads = loss.backward().unwrap();
    for (path, var) in &vars {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {path}"));
        let expected = get(&r, &format!("grad.{path}"))
            .to_device(&Device::Cpu)
            .unwrap();
        // Gradients are ~1e-3 in size: compare relative to the reference's own scale.
        let scale = max_abs(&expected);
        let err = max_abs(&(g.to_device(&Device::Cpu).unwrap() - &expected).unwrap());
        assert!(
            err <= 1e-3 * scale,
            "grad {path}: error {err:e}, reference scale {scale:e}"
        );
    }
}
