//! `RawJobSpec::validate`: the defaults (the paper's where it has one) and the range checks
//! that turn the spec as written into a [`JobSpec`].

use std::path::{Path, PathBuf};

use super::{EvalSpec, IterationSpec, JobSpec, RawJobSpec, SamplingSpec, SpecError, TrainingSpec};

fn invalid(field: &str, value: impl std::fmt::Display, reason: &str) -> SpecError {
    SpecError::Invalid {
        field: field.to_string(),
        value: value.to_string(),
        reason: reason.to_string(),
    }
}

impl RawJobSpec {
    /// Fills defaults (the paper's where it has one) and checks every range. Relative paths are
    /// taken relative to `base_dir` (the spec file's folder).
    pub fn validate(self, base_dir: &Path) -> Result<JobSpec, SpecError> {
        let t = &self.training;
        let resolve = |p: &PathBuf| {
            if p.is_absolute() {
                p.clone()
            } else {
                base_dir.join(p)
            }
        };
        let seed = self.job.seed.unwrap_or(5_775_709);
        let name = self
            .job
            .name
            .clone()
            .unwrap_or_else(|| "spin-job".to_string());
        if name.trim().is_empty() || name.len() > 200 {
            // A huge name is not echoed back whole.
            let shown = if name.len() > 200 {
                format!("a name of {} bytes", name.len())
            } else {
                format!("{name:?}")
            };
            return Err(invalid("job.name", shown, "must be 1 to 200 characters"));
        }
        if self.model.base.as_os_str().is_empty() {
            return Err(invalid(
                "model.base",
                "\"\"",
                "must name a diffusers pipeline folder",
            ));
        }
        if self.data.train.is_empty() {
            return Err(invalid(
                "data.train",
                "[]",
                "must list at least one parquet file or folder",
            ));
        }
        let resolution = self.data.resolution.unwrap_or(512);
        if !(8..=4096).contains(&resolution) || !resolution.is_multiple_of(8) {
            return Err(invalid(
                "data.resolution",
                resolution,
                "must be a multiple of 8 in 8..=4096",
            ));
        }
        let held_out_fraction = self.data.held_out_fraction.unwrap_or(0.05);
        if !(0.0..1.0).contains(&held_out_fraction) {
            return Err(invalid(
                "data.held_out_fraction",
                held_out_fraction,
                "must be in [0, 1)",
            ));
        }
        let sampling = SamplingSpec {
            steps: self.sampling.steps.unwrap_or(50),
            guidance: self.sampling.guidance.unwrap_or(7.5),
            eta: self.sampling.eta.unwrap_or(0.0),
            batch_size: self.sampling.batch_size.unwrap_or(8),
            shard_size: self.sampling.shard_size.unwrap_or(64),
        };
        if !(1..=1000).contains(&sampling.steps) {
            return Err(invalid(
                "sampling.steps",
                sampling.steps,
                "must be in 1..=1000",
            ));
        }
        if !(sampling.guidance.is_finite() && sampling.guidance >= 0.0) {
            return Err(invalid(
                "sampling.guidance",
                sampling.guidance,
                "must be finite and >= 0",
            ));
        }
        if !(0.0..=1.0).contains(&sampling.eta) {
            return Err(invalid("sampling.eta", sampling.eta, "must be in [0, 1]"));
        }
        if sampling.batch_size == 0 {
            return Err(invalid("sampling.batch_size", 0, "must be at least 1"));
        }
        if !(1..=1_000_000).contains(&sampling.shard_size) {
            return Err(invalid(
                "sampling.shard_size",
                sampling.shard_size,
                "must be in 1..=1000000",
            ));
        }
        let training = TrainingSpec {
            objective: t.objective.unwrap_or_default(),
            loss: t.loss.unwrap_or_default(),
            weighting: t.weighting.unwrap_or_default(),
            noise: t.noise.unwrap_or_default(),
            reduction: t.reduction.unwrap_or_default(),
            batch_size: t.batch_size.unwrap_or(8),
            // 8 pairs x 256 micro-batches = the paper's global batch of 2048 (8 GPUs x 8 x 32).
            gradient_accumulation: t.gradient_accumulation.unwrap_or(256),
            lr_schedule: t.lr_schedule.unwrap_or_default(),
            warmup_steps: t.warmup_steps.unwrap_or(200),
            max_grad_norm: t.max_grad_norm.unwrap_or(1.0),
            adam_beta1: t.adam_beta1.unwrap_or(0.9),
            adam_beta2: t.adam_beta2.unwrap_or(0.999),
            adam_eps: t.adam_eps.unwrap_or(1e-8),
            weight_decay: t.weight_decay.unwrap_or(1e-2),
            nonfinite: t.nonfinite.unwrap_or_default(),
            max_skipped_steps: t.max_skipped_steps.unwrap_or(10),
            checkpoint_every: t.checkpoint_every.unwrap_or(50),
        };
        if !(1..=4096).contains(&training.batch_size) {
            return Err(invalid(
                "training.batch_size",
                training.batch_size,
                "must be in 1..=4096",
            ));
        }
        if !(1..=65536).contains(&training.gradient_accumulation) {
            return Err(invalid(
                "training.gradient_accumulation",
                training.gradient_accumulation,
                "must be in 1..=65536",
            ));
        }
        for (field, value) in [
            ("training.adam_beta1", training.adam_beta1),
            ("training.adam_beta2", training.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&value) {
                return Err(invalid(field, value, "must be in [0, 1)"));
            }
        }
        if !(training.adam_eps > 0.0 && training.adam_eps.is_finite()) {
            return Err(invalid(
                "training.adam_eps",
                training.adam_eps,
                "must be > 0",
            ));
        }
        if !(training.weight_decay >= 0.0 && training.weight_decay.is_finite()) {
            return Err(invalid(
                "training.weight_decay",
                training.weight_decay,
                "must be >= 0",
            ));
        }
        if !(training.max_grad_norm >= 0.0 && training.max_grad_norm.is_finite()) {
            return Err(invalid(
                "training.max_grad_norm",
                training.max_grad_norm,
                "must be >= 0 (0 disables clipping)",
            ));
        }
        if self.iteration.is_empty() {
            return Err(invalid(
                "iteration",
                "[]",
                "give at least one [[iteration]] with lr and steps",
            ));
        }
        let mut iterations = Vec::with_capacity(self.iteration.len());
        for (i, it) in self.iteration.iter().enumerate() {
            let beta = it.beta.unwrap_or(2000.0);
            if !(it.lr > 0.0 && it.lr.is_finite() && it.lr < 1.0) {
                return Err(invalid(
                    &format!("iteration[{i}].lr"),
                    it.lr,
                    "must be in (0, 1)",
                ));
            }
            if !(beta > 0.0 && beta.is_finite()) {
                return Err(invalid(
                    &format!("iteration[{i}].beta"),
                    beta,
                    "must be > 0",
                ));
            }
            if !(1..=10_000_000).contains(&it.steps) {
                return Err(invalid(
                    &format!("iteration[{i}].steps"),
                    it.steps,
                    "must be in 1..=10000000",
                ));
            }
            iterations.push(IterationSpec {
                lr: it.lr,
                beta,
                steps: it.steps,
            });
        }
        let eval = EvalSpec {
            samples: self.eval.samples.unwrap_or(16),
            loss_timesteps: self.eval.loss_timesteps.unwrap_or(8),
            grid_columns: self.eval.grid_columns.unwrap_or(4).max(1),
        };
        Ok(JobSpec {
            name,
            seed,
            output: resolve(
                &self
                    .job
                    .output
                    .clone()
                    .unwrap_or_else(|| PathBuf::from("spin-runs")),
            ),
            base_model: resolve(&self.model.base),
            train_data: self.data.train.iter().map(resolve).collect(),
            resolution,
            held_out_fraction,
            max_prompts: self.data.max_prompts.unwrap_or(0),
            random_flip: self.data.random_flip.unwrap_or(true),
            sampling,
            training,
            iterations,
            eval,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use crate::spec::tests::{write, MINIMAL};
    use crate::spec::{JobSpec, Objective};
    use std::collections::HashMap;

    #[test]
    fn defaults_are_the_papers() {
        let spec = JobSpec::load(&write("min", MINIMAL), &HashMap::new()).unwrap();
        assert_eq!(spec.seed, 5_775_709);
        assert_eq!(spec.sampling.steps, 50);
        assert_eq!(spec.sampling.guidance, 7.5);
        assert_eq!(spec.training.objective, Objective::Spin);
        assert_eq!(spec.global_batch(), 2048);
        assert_eq!(spec.training.warmup_steps, 200);
        assert_eq!(spec.training.max_grad_norm, 1.0);
        assert_eq!(spec.training.weight_decay, 1e-2);
        assert_eq!(spec.iterations[0].beta, 2000.0);
        assert!(spec.base_model.ends_with("base"));
    }

    #[test]
    fn out_of_range_values_name_the_field() {
        let cases = [
            ("[sampling]\nsteps = 0\n", "sampling.steps"),
            (
                "[data]\ntrain = [\"d\"]\nresolution = 30\n",
                "data.resolution",
            ),
            ("[training]\nadam_beta1 = 1.5\n", "training.adam_beta1"),
            ("[training]\nbatch_size = 0\n", "training.batch_size"),
        ];
        for (extra, field) in cases {
            let text = if extra.starts_with("[data]") {
                format!("[model]\nbase = \"b\"\n{extra}[[iteration]]\nlr = 1e-5\nsteps = 1\n")
            } else {
                format!("{MINIMAL}{extra}")
            };
            let err = JobSpec::load(&write(field, &text), &HashMap::new())
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{field}: {err}");
        }
        let bad_lr = MINIMAL.replace("lr = 2e-5", "lr = -1.0");
        let err = JobSpec::load(&write("lr", &bad_lr), &HashMap::new())
            .unwrap_err()
            .to_string();
        assert!(err.contains("iteration[0].lr"), "{err}");
    }
}
