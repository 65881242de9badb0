//! AdamW exactly as `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments, eps
//! added after the square root), and the learning-rate schedules of a job.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::Tensor;
use serde::{Deserialize, Serialize};

use super::grads::ParamGrads;
use crate::weights::KeyPath;

/// AdamW hyperparameters (the paper's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Added to the root of the second moment.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 1e-2,
        }
    }
}

/// Moments of one parameter, flat.
#[derive(Clone, Debug)]
pub struct Moments {
    /// First moment.
    pub m: Tensor<1>,
    /// Second moment.
    pub v: Tensor<1>,
}

/// The optimizer and its state, keyed by parameter key.
#[derive(Clone, Debug)]
pub struct AdamW {
    config: AdamWConfig,
    step: u64,
    moments: HashMap<String, Moments>,
}

impl AdamW {
    /// A fresh optimizer.
    pub fn new(config: AdamWConfig) -> Self {
        Self {
            config,
            step: 0,
            moments: HashMap::new(),
        }
    }

    /// Steps taken so far.
    pub fn steps_taken(&self) -> u64 {
        self.step
    }

    /// The moments of every parameter, by key.
    pub fn moments(&self) -> &HashMap<String, Moments> {
        &self.moments
    }

    /// Rebuilds an optimizer from saved state.
    pub fn from_state(config: AdamWConfig, step: u64, moments: HashMap<String, Moments>) -> Self {
        Self {
            config,
            step,
            moments,
        }
    }

    /// Applies one update with learning rate `lr` to every parameter of `module` that has a
    /// gradient in `grads`; returns the updated module.
    pub fn step<M: Module>(&mut self, module: M, grads: &ParamGrads, lr: f64) -> M {
        self.step += 1;
        let grads: HashMap<&str, &Tensor<1>> = grads
            .entries()
            .iter()
            .map(|(k, g)| (k.as_str(), g))
            .collect();
        let mut updater = Updater {
            path: KeyPath::default(),
            grads,
            optimizer: self,
            lr,
        };
        module.map(&mut updater)
    }

    fn update(&mut self, key: &str, param: Tensor<1>, grad: &Tensor<1>, lr: f64) -> Tensor<1> {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        let t = self.step as i32;
        let moments = self
            .moments
            .entry(key.to_string())
            .or_insert_with(|| Moments {
                m: grad.zeros_like(),
                v: grad.zeros_like(),
            });
        moments.m = moments.m.clone() * beta1 + grad.clone() * (1.0 - beta1);
        moments.v = moments.v.clone() * beta2 + grad.clone().powi_scalar(2) * (1.0 - beta2);
        let bias1 = 1.0 - beta1.powi(t);
        let bias2 = 1.0 - beta2.powi(t);
        let denom = moments.v.clone().sqrt() / bias2.sqrt() + eps;
        let decayed = param * (1.0 - lr * weight_decay);
        decayed - moments.m.clone() / denom * (lr / bias1)
    }
}

struct Updater<'a> {
    path: KeyPath,
    grads: HashMap<&'a str, &'a Tensor<1>>,
    optimizer: &'a mut AdamW,
    lr: f64,
}

impl ModuleMapper for Updater<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = self.path.key("");
        let Some(grad) = self.grads.get(key.as_str()) else {
            return param;
        };
        let value = param.val();
        let shape = value.shape();
        let was_tracked = value.is_require_grad();
        let flat = value.inner().reshape([shape.num_elements()]);
        let updated = self
            .optimizer
            .update(&key, flat, grad, self.lr)
            .reshape(shape);
        let updated = if was_tracked {
            updated.autodiff().require_grad()
        } else {
            updated
        };
        Param::initialized(param.id, updated)
    }
}

/// Learning rate as a function of the optimizer step.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum LrSchedule {
    /// `lr * min(1, (step + 1) / warmup)`, then constant.
    Constant {
        /// Peak rate.
        lr: f64,
        /// Warm-up steps.
        warmup: u64,
    },
    /// Linear warm-up to `lr` over `warmup` steps, then linear decay to 0 at `total`
    /// (transformers' `get_linear_schedule_with_warmup`).
    Linear {
        /// Peak rate.
        lr: f64,
        /// Warm-up steps.
        warmup: u64,
        /// Total steps.
        total: u64,
    },
}

impl LrSchedule {
    /// The rate for (0-based) optimizer step `step`.
    pub fn lr(&self, step: u64) -> f64 {
        match *self {
            Self::Constant { lr, warmup } => {
                if step < warmup {
                    lr * step as f64 / warmup as f64
                } else {
                    lr
                }
            }
            Self::Linear { lr, warmup, total } => {
                if step < warmup {
                    lr * step as f64 / warmup.max(1) as f64
                } else {
                    let remaining = total.saturating_sub(step) as f64;
                    lr * (remaining / total.saturating_sub(warmup).max(1) as f64).max(0.0)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_schedule_warms_up_then_decays_to_zero() {
        let s = LrSchedule::Linear {
            lr: 1.0,
            warmup: 10,
            total: 110,
        };
        assert_eq!(s.lr(0), 0.0);
        assert_eq!(s.lr(5), 0.5);
        assert_eq!(s.lr(10), 1.0);
        assert_eq!(s.lr(60), 0.5);
        assert_eq!(s.lr(110), 0.0);
        assert_eq!(s.lr(200), 0.0);
    }

    #[test]
    fn constant_schedule_with_warmup() {
        let s = LrSchedule::Constant { lr: 2.0, warmup: 4 };
        assert_eq!(s.lr(1), 0.5);
        assert_eq!(s.lr(4), 2.0);
        assert_eq!(s.lr(1000), 2.0);
    }
}
