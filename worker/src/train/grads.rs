//! Gradients by parameter key, in module order: what the collective all-reduces (as one flat
//! buffer), what clipping measures and what the optimizer consumes.

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::{Gradients, Tensor, TensorData};

use crate::weights::KeyPath;

/// One flattened gradient per trainable parameter, in module order.
#[derive(Clone, Debug)]
pub struct ParamGrads {
    entries: Vec<(String, Tensor<1>)>,
}

struct GradCollector<'a> {
    path: KeyPath,
    grads: &'a Gradients,
    entries: Vec<(String, Tensor<1>)>,
}

impl ModuleVisitor for GradCollector<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = param.val().grad(self.grads) {
            let numel = grad.shape().num_elements();
            self.entries
                .push((self.path.key(""), grad.reshape([numel])));
        }
    }
}

impl ParamGrads {
    /// The gradients of `module`'s parameters in `grads` (parameters without one are left out).
    pub fn collect<M: Module>(module: &M, grads: &Gradients) -> Self {
        let mut collector = GradCollector {
            path: KeyPath::default(),
            grads,
            entries: Vec::new(),
        };
        module.visit(&mut collector);
        Self {
            entries: collector.entries,
        }
    }

    /// No gradients at all.
    pub fn empty() -> Self {
        Self {
            entries: Vec::new(),
        }
    }

    /// `(key, flat gradient)` pairs in module order.
    pub fn entries(&self) -> &[(String, Tensor<1>)] {
        &self.entries
    }

    /// The flat gradient of `key`.
    pub fn get(&self, key: &str) -> Option<&Tensor<1>> {
        self.entries.iter().find(|(k, _)| k == key).map(|(_, g)| g)
    }

    /// Total number of gradient values.
    pub fn numel(&self) -> usize {
        self.entries.iter().map(|(_, g)| g.dims()[0]).sum()
    }

    /// `self += other` (gradient accumulation); both must come from the same module.
    pub fn accumulate(&mut self, other: ParamGrads) {
        for ((key, mine), (other_key, theirs)) in self.entries.iter_mut().zip(other.entries) {
            debug_assert_eq!(key, &other_key);
            *mine = mine.clone() + theirs;
        }
    }

    /// Multiplies every gradient by `factor`.
    pub fn scale(&mut self, factor: f64) {
        for (_, grad) in &mut self.entries {
            *grad = grad.clone() * factor;
        }
    }

    /// The L2 norm of all gradients together.
    pub fn global_norm(&self) -> f64 {
        let sum: f64 = self
            .entries
            .iter()
            .map(|(_, g)| g.clone().powi_scalar(2).sum().into_scalar::<f32>() as f64)
            .sum();
        sum.sqrt()
    }

    /// Scales the gradients so their global norm is at most `max_norm` (torch's
    /// `clip_grad_norm_`: factor `max_norm / (norm + 1e-6)` when it is below 1); returns the norm
    /// before clipping.
    pub fn clip_global_norm(&mut self, max_norm: f64) -> f64 {
        let norm = self.global_norm();
        let factor = max_norm / (norm + 1e-6);
        if factor < 1.0 {
            self.scale(factor);
        }
        norm
    }

    /// Whether every value is finite.
    pub fn all_finite(&self) -> bool {
        self.global_norm().is_finite()
    }

    /// All gradients as one flat f32 buffer (module order), for the collective.
    pub fn to_flat(&self) -> Vec<f32> {
        let mut flat = Vec::with_capacity(self.numel());
        for (_, grad) in &self.entries {
            flat.extend(grad.to_data().convert::<f32>().iter::<f32>());
        }
        flat
    }

    /// Replaces the values with those of `flat` (as produced by [`to_flat`](Self::to_flat)).
    pub fn set_flat(&mut self, flat: &[f32]) {
        let mut offset = 0;
        for (_, grad) in &mut self.entries {
            let n = grad.dims()[0];
            let device = grad.device();
            *grad = Tensor::from_data(
                TensorData::new(flat[offset..offset + n].to_vec(), [n]),
                &device,
            );
            offset += n;
        }
    }
}
