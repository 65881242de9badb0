//! Golden tests of the training objectives (DESIGN.md §1) and of the AdamW step against the
//! PyTorch reference `scripts/make_objective_fixtures.py` (fixtures in
//! `tests/fixtures/objectives/`, whose README gives the formulas and the float32 noise floor).
//!
//! theta (`objectives/theta`, on the autodiff device) is trained against theta_k (`tiny-a/unet`,
//! plain device). Every case of `cases.json` is checked: loss, `z`, `w_t`, three named
//! gradients and the global gradient norm; then log 2 at theta = theta_k, and three AdamW steps.
//! Errors are printed (`cargo test -p spin-worker --test objectives_golden -- --nocapture`).

mod common;

use std::collections::BTreeSet;
use std::f64::consts::LN_2;

use burn::tensor::{Device, Tensor, TensorData};
use common::fixture;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::Deserialize;
use spin_worker::models::unet_2d_condition::UNet2DConditionModel;
use spin_worker::schedulers::{NoiseSchedule, SchedulerConfig};
use spin_worker::train::objectives::{
    ddim_h, loss_and_grads, LossFunction, NoiseMode, Objective, ObjectiveConfig, PairBatch,
    Reduction, Trajectory, Weighting,
};
use spin_worker::train::{AdamW, AdamWConfig, LrSchedule};
use spin_worker::weights::{visit_named_params, WeightFile};

/// DDIM steps of the fixtures' sampling schedule (`traj_timesteps` = [751, 501, 251, 1]).
const SAMPLING_STEPS: usize = 4;

/// The parameters whose gradients (and AdamW values) the reference records.
const PARAM_KEYS: [&str; 3] = [
    "conv_in.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "up_blocks.1.resnets.0.conv1.weight",
];

/// Relative tolerance of loss, z, gradients and gradient norm. The worst case measured is 7.8e-5
/// (the loss of `spin_shared` and `dpo`): `z = -beta w D` with `D` a difference of four float32
/// MSEs of about 1.5 (ulp 1.2e-7), so `z` carries an absolute error of beta * a few ulp (7e-4
/// here: 3 ulp, twice torch's own float32 error), and the pair with z = -9 passes half of it into
/// a loss of 4.6. Gradients and norms stay below 4.2e-5, most below 5e-6.
const REL_TOL: f64 = 1e-4;

/// `w_t = h_t^2` from the same float32 abar values on both sides, but torch evaluates `h_t` (a
/// difference of two nearly equal terms) in float32 and the Rust side in float64: measured 1.5e-6.
const W_TOL: f64 = 1e-5;

/// Denominator floor of the relative error.
const TINY: f64 = 1e-30;

/// Every case the reference writes; `cases.json` must list exactly these.
const CASE_NAMES: [&str; 16] = [
    "spin",
    "spin_hinge",
    "spin_correlation",
    "spin_h2",
    "spin_shared",
    "spin_sum",
    "spin_trajectory",
    "spin_trajectory_h2",
    "spin_exact",
    "spin_exact_h2",
    "dpo",
    "sft",
    "sft_sum",
    "spin_trajectory_beta200",
    "spin_exact_beta20",
    "spin_exact_h2_beta20",
];

/// One entry of `cases.json`.
#[derive(Clone, Debug, Deserialize)]
struct Case {
    name: String,
    objective: Objective,
    loss: LossFunction,
    weighting: Weighting,
    noise: NoiseMode,
    reduction: Reduction,
    beta: f64,
}

impl Case {
    fn config(&self) -> ObjectiveConfig {
        ObjectiveConfig {
            objective: self.objective,
            loss: self.loss,
            weighting: self.weighting,
            noise: self.noise,
            reduction: self.reduction,
            beta: self.beta,
            sampling_steps: SAMPLING_STEPS,
        }
    }
}

fn objectives_fixture(name: &str) -> std::path::PathBuf {
    fixture("objectives").join(name)
}

fn cases() -> Vec<Case> {
    let text =
        std::fs::read_to_string(objectives_fixture("cases.json")).expect("objectives/cases.json");
    serde_json::from_str(&text).expect("cases.json parses into objective settings")
}

fn case(name: &str) -> Case {
    cases()
        .into_iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("case {name} missing from cases.json"))
}

fn expected() -> WeightFile {
    WeightFile::open(&objectives_fixture("expected.safetensors")).expect("expected.safetensors")
}

fn inputs() -> WeightFile {
    WeightFile::open(&objectives_fixture("inputs.safetensors")).expect("inputs.safetensors")
}

fn schedule() -> NoiseSchedule {
    NoiseSchedule::new(&SchedulerConfig::stable_diffusion())
}

/// theta on the autodiff device (its parameters require gradients).
fn load_theta(dir: &std::path::Path) -> UNet2DConditionModel {
    UNet2DConditionModel::load(dir, &Device::flex().autodiff())
        .expect("theta")
        .0
}

/// theta_k, the frozen reference, on the plain device.
fn load_reference() -> UNet2DConditionModel {
    UNet2DConditionModel::load(&fixture("tiny-a").join("unet"), &Device::flex())
        .expect("theta_k")
        .0
}

/// Integer tensors are stored as int64 and read back as exact f32 values.
fn indices(file: &WeightFile, key: &str) -> Vec<usize> {
    file.require(key)
        .expect("index tensor")
        .values
        .iter()
        .map(|&v| {
            assert!(v >= 0.0 && v.fract() == 0.0, "{key}: {v} is not an index");
            v as usize
        })
        .collect()
}

/// The fixture batch (constants, on the plain device).
fn fixture_batch() -> PairBatch {
    let inputs = inputs();
    let device = Device::flex();
    let t4 = |key: &str| -> Tensor<4> { inputs.tensor(key, &device).expect(key) };
    let t5 = |key: &str| -> Tensor<5> { inputs.tensor(key, &device).expect(key) };
    PairBatch {
        x0_win: t4("x0_win"),
        x0_lose: t4("x0_lose"),
        context: inputs.tensor("context", &device).expect("context"),
        t: indices(&inputs, "t"),
        eps: t4("eps"),
        eps_lose: t4("eps_lose"),
        trajectory: Some(Trajectory {
            states: t5("traj_states"),
            timesteps: indices(&inputs, "traj_timesteps"),
            index: indices(&inputs, "traj_index"),
            eps_steps: t5("eps_steps"),
        }),
    }
}

fn values<const D: usize>(tensor: &Tensor<D>) -> Vec<f32> {
    tensor
        .to_data()
        .convert::<f32>()
        .try_to_vec::<f32>()
        .expect("f32 data")
}

/// `max|a - e| / max(max|e|, TINY)`.
fn rel_err(actual: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "length mismatch");
    let diff = actual
        .iter()
        .zip(expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0.0, f64::max);
    let scale = expected.iter().map(|e| e.abs()).fold(0.0, f64::max);
    if diff.is_nan() {
        return f64::INFINITY;
    }
    diff / scale.max(TINY)
}

fn widen(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// Collects comparisons, prints each, and fails at the end with every violation listed.
#[derive(Default)]
struct Report {
    failures: Vec<String>,
    worst: f64,
}

impl Report {
    /// Checks a relative error against `tol`.
    fn rel(&mut self, what: &str, actual: &[f64], expected: &[f64], tol: f64) {
        let err = if actual.iter().all(|v| v.is_finite()) {
            rel_err(actual, expected)
        } else {
            f64::INFINITY
        };
        eprintln!("  {what:<78} rel err {err:.3e} (tol {tol:.0e})");
        self.worst = self.worst.max(err);
        if err.is_nan() || err > tol {
            self.failures
                .push(format!("{what}: relative error {err:.3e} > {tol:.0e}"));
        }
    }

    /// Checks an absolute error against `tol`.
    fn abs(&mut self, what: &str, actual: &[f64], expected: &[f64], tol: f64) {
        assert_eq!(actual.len(), expected.len(), "{what}: length mismatch");
        let err = actual
            .iter()
            .zip(expected)
            .map(|(a, e)| {
                if (a - e).is_nan() {
                    f64::INFINITY
                } else {
                    (a - e).abs()
                }
            })
            .fold(0.0, f64::max);
        eprintln!("  {what:<78} abs err {err:.3e} (tol {tol:.0e})");
        if err > tol {
            self.failures
                .push(format!("{what}: absolute error {err:.3e} > {tol:.0e}"));
        }
    }

    fn check(&mut self, what: &str, ok: bool, detail: String) {
        eprintln!("  {what:<78} {detail}");
        if !ok {
            self.failures.push(format!("{what}: {detail}"));
        }
    }

    fn finish(self, name: &str) {
        eprintln!("{name}: worst relative error {:.3e}", self.worst);
        assert!(
            self.failures.is_empty(),
            "{name}: {} check(s) failed:\n  {}",
            self.failures.len(),
            self.failures.join("\n  ")
        );
    }
}

/// The timesteps `w` is recorded for: per pair (spin, dpo, spin-trajectory) or per schedule
/// step (spin-exact).
fn weight_timesteps(case: &Case, batch: &PairBatch) -> Vec<usize> {
    let traj = batch.trajectory.as_ref().expect("fixture trajectory");
    match case.objective {
        Objective::Spin | Objective::Dpo | Objective::Sft => batch.t.clone(),
        Objective::SpinTrajectory => traj.index.iter().map(|&k| traj.timesteps[k]).collect(),
        Objective::SpinExact => traj.timesteps.clone(),
    }
}

fn check_case(name: &str) {
    let case = case(name);
    let expected = expected();
    let schedule = schedule();
    let theta = load_theta(&objectives_fixture("theta"));
    let reference = load_reference();
    let batch = fixture_batch();
    let config = case.config();
    eprintln!("case {name}: {config:?}");

    let out = loss_and_grads(&theta, &reference, &batch, &config, &schedule)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut report = Report::default();
    let want = |key: &str| -> Vec<f64> {
        widen(
            &expected
                .require(&format!("{name}.{key}"))
                .expect("expected tensor")
                .values,
        )
    };

    let loss_expected = want("loss");
    let grad_norm_expected = want("grad_norm");
    // spin_exact / spin_exact_h2 saturate: z ~ 150, so the float32 loss and every gradient are
    // exactly 0 in the reference (float64: ~1e-66).
    let saturated = loss_expected[0] == 0.0 && grad_norm_expected[0] == 0.0;

    if case.objective == Objective::Sft {
        report.check(
            "z (none for sft)",
            out.z.is_empty(),
            format!("{} values", out.z.len()),
        );
    } else {
        report.rel("z", &out.z, &want("z"), REL_TOL);
        let w: Vec<f64> = weight_timesteps(&case, &batch)
            .into_iter()
            .map(|t| match case.weighting {
                Weighting::None => 1.0,
                Weighting::H2 => ddim_h(&schedule, t, SAMPLING_STEPS).powi(2),
            })
            .collect();
        report.rel("w (ddim_h^2 or 1)", &w, &want("w"), W_TOL);
    }

    let grad_norm = out.grads.global_norm();
    if saturated {
        // Float64 gives ~1e-66 here: anything above 1e-30 is not underflow but a wrong value.
        report.abs("loss (saturated: 0)", &[out.loss], &[0.0], 1e-30);
        report.abs("grad_norm (saturated: 0)", &[grad_norm], &[0.0], 1e-30);
    } else {
        report.rel("loss", &[out.loss], &loss_expected, REL_TOL);
        report.rel("grad_norm", &[grad_norm], &grad_norm_expected, REL_TOL);
    }
    for key in PARAM_KEYS {
        let stored = expected
            .require(&format!("{name}.grad.{key}"))
            .expect("expected gradient");
        let grad = out
            .grads
            .get(key)
            .unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
        let actual = widen(&values(grad));
        let e = widen(&stored.values);
        if saturated {
            report.abs(&format!("grad {key} (saturated: 0)"), &actual, &e, 1e-30);
        } else {
            report.rel(&format!("grad {key}"), &actual, &e, REL_TOL);
        }
    }
    report.finish(name);
}

macro_rules! golden_cases {
    ($($test:ident => $name:literal,)*) => {
        $(
            #[test]
            fn $test() {
                check_case($name);
            }
        )*
    };
}

golden_cases! {
    case_spin => "spin",
    case_spin_hinge => "spin_hinge",
    case_spin_correlation => "spin_correlation",
    case_spin_h2 => "spin_h2",
    case_spin_shared => "spin_shared",
    case_spin_sum => "spin_sum",
    case_spin_trajectory => "spin_trajectory",
    case_spin_trajectory_h2 => "spin_trajectory_h2",
    case_spin_exact => "spin_exact",
    case_spin_exact_h2 => "spin_exact_h2",
    case_dpo => "dpo",
    case_sft => "sft",
    case_sft_sum => "sft_sum",
    case_spin_trajectory_beta200 => "spin_trajectory_beta200",
    case_spin_exact_beta20 => "spin_exact_beta20",
    case_spin_exact_h2_beta20 => "spin_exact_h2_beta20",
}

#[test]
fn cases_json_lists_exactly_the_tested_cases() {
    let listed: BTreeSet<String> = cases().into_iter().map(|c| c.name).collect();
    let tested: BTreeSet<String> = CASE_NAMES.iter().map(|s| s.to_string()).collect();
    assert_eq!(listed, tested, "cases.json and the golden tests disagree");
    let expected = expected();
    for name in CASE_NAMES {
        assert!(
            expected.get(&format!("{name}.loss")).is_some(),
            "expected.safetensors lacks {name}"
        );
    }
}

#[test]
fn noise_schedule_matches_the_fixture_abar() {
    let schedule = schedule();
    let stored = inputs();
    let abar = &stored.require("alphas_cumprod").expect("abar").values;
    assert_eq!(abar.len(), schedule.num_train_timesteps());
    let ours: Vec<f64> = (0..abar.len())
        .map(|t| schedule.alpha_cumprod(t as i64, 1.0))
        .collect();
    let mut report = Report::default();
    report.rel("alphas_cumprod", &ours, &widen(abar), 1e-6);
    report.finish("noise schedule");
}

/// A batch of `b` pairs with fresh standard-normal latents, noise and context.
fn random_batch(b: usize, t: Vec<usize>, seed: u64) -> PairBatch {
    let device = Device::flex();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut normal = |shape: Vec<usize>| -> TensorData {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        TensorData::new(v, shape)
    };
    let latent = vec![b, 4, 16, 16];
    PairBatch {
        x0_win: Tensor::from_data(normal(latent.clone()), &device),
        x0_lose: Tensor::from_data(normal(latent.clone()), &device),
        context: Tensor::from_data(normal(vec![b, 77, 32]), &device),
        t,
        eps: Tensor::from_data(normal(latent.clone()), &device),
        eps_lose: Tensor::from_data(normal(latent), &device),
        trajectory: None,
    }
}

#[test]
fn spin_loss_is_log_2_at_the_reference() {
    let schedule = schedule();
    // theta = theta_k, both loaded from tiny-a: theta tracked, theta_k plain.
    let theta = load_theta(&fixture("tiny-a").join("unet"));
    let reference = load_reference();
    let config = ObjectiveConfig {
        sampling_steps: SAMPLING_STEPS,
        ..ObjectiveConfig::default()
    };
    let stored = expected()
        .require("at_reference.loss")
        .expect("at_reference.loss")
        .values[0];
    assert!((f64::from(stored) - LN_2).abs() < 1e-7, "fixture log 2");

    for (what, batch) in [
        ("fixture batch", fixture_batch()),
        ("random batch", random_batch(3, vec![0, 481, 999], 7)),
    ] {
        let out = loss_and_grads(&theta, &reference, &batch, &config, &schedule)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let z_max = out.z.iter().map(|z| z.abs()).fold(0.0, f64::max);
        eprintln!(
            "at reference, {what}: loss {:.9} (log 2 = {LN_2:.9}, |diff| {:.3e}), max |z| {z_max:.3e}, grad norm {:.6e}",
            out.loss,
            (out.loss - LN_2).abs(),
            out.grads.global_norm()
        );
        assert_eq!(out.z.len(), batch.t.len(), "{what}: one z per pair");
        // D = 0 exactly when theta and theta_k compute the same forward; allow one float32 ulp
        // of log 2 for the loss.
        assert!(z_max == 0.0, "{what}: z = {:?}, expected 0", out.z);
        assert!(
            (out.loss - LN_2).abs() <= 1e-7,
            "{what}: loss {} is not log 2",
            out.loss
        );
        // The gradient is -1/2 dz/dtheta: not zero at the reference.
        let norm = out.grads.global_norm();
        assert!(norm.is_finite() && norm > 0.0, "{what}: grad norm {norm}");
    }
}

/// The current values of the [`PARAM_KEYS`] parameters, flat, in `PARAM_KEYS` order.
fn param_values(module: &UNet2DConditionModel) -> Vec<Vec<f32>> {
    let mut found: Vec<(String, Vec<f32>)> = Vec::new();
    visit_named_params(module, |key, value, _shape| {
        if PARAM_KEYS.contains(&key.as_str()) {
            found.push((key, values(&value)));
        }
    });
    PARAM_KEYS
        .iter()
        .map(|key| {
            found
                .iter()
                .find(|(k, _)| k == key)
                .unwrap_or_else(|| panic!("parameter {key} not visited"))
                .1
                .clone()
        })
        .collect()
}

/// torch's AdamW on one flat parameter, in float64: the independent replay of the optimizer.
struct AdamReplay {
    m: Vec<f64>,
    v: Vec<f64>,
}

impl AdamReplay {
    const BETAS: (f64, f64) = (0.9, 0.999);
    const EPS: f64 = 1e-8;
    const WEIGHT_DECAY: f64 = 1e-2;

    fn new(n: usize) -> Self {
        Self {
            m: vec![0.0; n],
            v: vec![0.0; n],
        }
    }

    /// Step `n` (1-based) with rate `lr`: returns the new parameter values.
    fn step(&mut self, param: &[f32], grad: &[f32], lr: f64, n: i32) -> Vec<f64> {
        let (b1, b2) = Self::BETAS;
        let (bias1, bias2) = (1.0 - b1.powi(n), 1.0 - b2.powi(n));
        param
            .iter()
            .zip(grad)
            .enumerate()
            .map(|(i, (&p, &g))| {
                let (p, g) = (f64::from(p), f64::from(g));
                self.m[i] = b1 * self.m[i] + (1.0 - b1) * g;
                self.v[i] = b2 * self.v[i] + (1.0 - b2) * g * g;
                let p = p * (1.0 - lr * Self::WEIGHT_DECAY);
                p - lr / bias1 * self.m[i] / (self.v[i].sqrt() / bias2.sqrt() + Self::EPS)
            })
            .collect()
    }
}

/// AdamW parameters against torch where float32 can decide the update. Adam's first real step
/// moves every element by about `lr * sign(g)` (the moments are bias-corrected, so
/// `m / sqrt(v) = g / |g|`), a function that jumps at `g = 0`; step 2 (gradient 0) repeats the
/// move from the moments. Where `|g| <= 10 * REL_TOL * max|g|` (ten times the gradient
/// tolerance) float32 does not pin the sign or size of that ratio, and two correct
/// implementations may move the element differently: those elements (59 of 6912 in
/// `up_blocks.1.resnets.0.conv1.weight`, 2 in the others) are held only to the size of the moves,
/// `2 * sum of lr`. Measured: the other elements match to 3e-8; the worst undecided one is off
/// by 1.8e-5 after step 2 (its |g| is 8.1e-6 max|g|, at the gradients' float32 noise), which is
/// why the 1e-5 target cannot hold for every element.
const ADAMW_PARAM_TOL: f64 = 1e-6;

/// The float64 replay of torch's formula on the Rust gradients: float32 rounding of a ~0.1
/// value and of the step only (measured 3.3e-8).
const ADAMW_REPLAY_TOL: f64 = 1e-6;

#[test]
fn adamw_three_spin_steps_match_torch() {
    let expected = expected();
    let schedule = schedule();
    let reference = load_reference();
    let batch = fixture_batch();
    let config = case("spin").config();
    let lr_schedule = LrSchedule::Linear {
        lr: 1e-3,
        warmup: 2,
        total: 10,
    };
    let mut optimizer = AdamW::new(AdamWConfig {
        beta1: AdamReplay::BETAS.0,
        beta2: AdamReplay::BETAS.1,
        eps: AdamReplay::EPS,
        weight_decay: AdamReplay::WEIGHT_DECAY,
    });
    let mut theta = load_theta(&objectives_fixture("theta"));
    let mut params = param_values(&theta);
    let mut replay: Vec<AdamReplay> = params.iter().map(|p| AdamReplay::new(p.len())).collect();
    // Steps 0 and 1 see the same parameters (lr 0 first), so `spin.grad.*` is their gradient;
    // step 2's is exactly 0 and only the moments move the parameters.
    // |g| / max|g| per element.
    let grad_share: Vec<Vec<f64>> = PARAM_KEYS
        .iter()
        .map(|key| {
            let g = &expected
                .require(&format!("spin.grad.{key}"))
                .expect("spin gradient")
                .values;
            let scale = f64::from(g.iter().fold(0.0f32, |m, x| m.max(x.abs())));
            g.iter().map(|&x| f64::from(x).abs() / scale).collect()
        })
        .collect();
    let mut report = Report::default();
    let mut lr_sum = 0.0;
    for step in 0..3u64 {
        let want = |key: &str| -> Vec<f64> {
            widen(
                &expected
                    .require(&format!("adamw.step{step}.{key}"))
                    .expect("expected adamw tensor")
                    .values,
            )
        };
        eprintln!("adamw step {step}");
        let lr = lr_schedule.lr(step);
        lr_sum += lr;
        // The fixture stores lr in float32.
        report.rel("lr", &[lr], &want("lr"), 1e-7);

        let out = loss_and_grads(&theta, &reference, &batch, &config, &schedule)
            .unwrap_or_else(|e| panic!("step {step}: {e}"));
        let mut grads = out.grads;
        let norm = grads.clip_global_norm(1.0);
        let (loss_e, norm_e) = (want("loss"), want("grad_norm"));
        if loss_e[0] == 0.0 {
            // Step 2: z ~ 400, the float32 loss and gradients underflow to 0 in torch.
            report.abs("loss (saturated: 0)", &[out.loss], &[0.0], 1e-30);
            report.abs("pre-clip grad norm (saturated: 0)", &[norm], &[0.0], 1e-30);
        } else {
            report.rel("loss", &[out.loss], &loss_e, REL_TOL);
            report.rel("pre-clip grad norm", &[norm], &norm_e, 1e-5);
        }
        report.rel("z", &out.z, &want("z"), REL_TOL);
        let clipped = grads.global_norm();
        let clipped_expected = if norm > 1.0 { 1.0 } else { norm };
        report.abs(
            "post-clip grad norm",
            &[clipped],
            &[clipped_expected],
            1e-5 * clipped_expected.max(1e-30),
        );

        let grad_values: Vec<Vec<f32>> = PARAM_KEYS
            .iter()
            .map(|key| values(grads.get(key).expect("gradient of a recorded key")))
            .collect();
        theta = optimizer.step(theta, &grads, lr);
        let updated = param_values(&theta);
        for (i, key) in PARAM_KEYS.iter().enumerate() {
            let ours = widen(&updated[i]);
            let replayed = replay[i].step(&params[i], &grad_values[i], lr, step as i32 + 1);
            report.abs(
                &format!("param {key} vs float64 replay"),
                &ours,
                &replayed,
                ADAMW_REPLAY_TOL,
            );

            let torch = want(&format!("param.{key}"));
            let (mut decided_err, mut undecided_err, mut undecided_n) = (0.0f64, 0.0f64, 0);
            let (mut worst, mut worst_share) = (0.0f64, 0.0f64);
            for ((a, e), &share) in ours.iter().zip(&torch).zip(&grad_share[i]) {
                let err = if (a - e).is_nan() {
                    f64::INFINITY
                } else {
                    (a - e).abs()
                };
                if share <= 10.0 * REL_TOL {
                    undecided_n += 1;
                    undecided_err = undecided_err.max(err);
                } else {
                    decided_err = decided_err.max(err);
                }
                if err > worst {
                    (worst, worst_share) = (err, share);
                }
            }
            report.abs(
                &format!("param {key} vs torch, sign-decided elements"),
                &[decided_err],
                &[0.0],
                ADAMW_PARAM_TOL,
            );
            report.abs(
                &format!("param {key} vs torch, {undecided_n} sign-undecided elements"),
                &[undecided_err],
                &[0.0],
                2.0 * lr_sum + ADAMW_PARAM_TOL,
            );
            eprintln!(
                "      (all elements: max abs err {worst:.3e}, where |g| = {worst_share:.1e} max|g|)"
            );
        }
        params = updated;
    }
    report.finish("adamw");
}
