//! Checkpoints and positioning: where a replica's weights come from before a train task
//! (theta_k, a checkpoint, or as they are), writing a checkpoint (theta, AdamW moments, state)
//! published by manifest with the two newest kept, and reading one back.

use std::collections::BTreeMap;
use std::time::Instant;

use burn::module::Module;
use spin_common::checkpoint::{self, CheckpointState};
use spin_common::store::layout;

use super::policy::{self, Position, ResumePlan, ThetaK};
use super::{store_error, JobRunner};
use crate::models::unet_2d_condition::UNet2DConditionModel;
use crate::train::data::{safetensors_bytes, to_vec};
use crate::train::optim::Moments;
use crate::train::{AdamW, TrainError};
use crate::weights::WeightFile;

impl JobRunner {
    /// Brings theta and the optimizer to "ready for step `first` of iteration `k`", as
    /// [`policy::resume_plan`] decides. Every iteration fine-tunes theta_k afresh (new
    /// moments, the schedule from its warm-up), so the state at an iteration's start is the
    /// snapshot alone.
    pub(super) fn position_at(&mut self, k: u32, first: u64) -> Result<(), TrainError> {
        let ResumePlan {
            restore_theta_k,
            checkpoint_after,
            fresh_optimizer,
        } = policy::resume_plan(self.held(), k, first);
        if restore_theta_k {
            self.restore_theta_k(k)?;
        }
        if let Some(step) = checkpoint_after {
            self.load_checkpoint(k, step)?;
        }
        if fresh_optimizer {
            self.optimizer = AdamW::new(self.optimizer_config());
        }
        Ok(())
    }

    /// Loads theta_k (k = 0: the base model; else the job's verified snapshot) as theta and,
    /// but for DPO, as the reference and opponent.
    pub(super) fn restore_theta_k(&mut self, k: u32) -> Result<(), TrainError> {
        let dir = match policy::theta_k(k) {
            ThetaK::Base => self.spec.base_model.clone(),
            ThetaK::Snapshot(k) => {
                let dir = self.store.path(&layout::snapshot(k)).map_err(store_error)?;
                spin_common::manifest::verify(&dir).map_err(|e| {
                    TrainError::Input(format!("theta_{k} is needed here but cannot be used: {e}"))
                })?;
                dir
            }
        };
        let train_device = self.device.clone().autodiff();
        let (theta, _) = UNet2DConditionModel::load(&dir.join("unet"), &train_device)?;
        self.theta = theta;
        if policy::reference_follows(self.spec.training.objective, k) {
            self.pipeline.unet = self.theta.valid();
        }
        self.reference_iteration = k;
        self.position = Some(Position::at(k, 0));
        self.opponents = None;
        tracing::info!(iteration = k, dir = %dir.display(), "loaded theta_k");
        Ok(())
    }

    /// Writes the checkpoint after `step` of iteration `k` (theta, optimizer moments, state)
    /// and publishes it with a manifest; keeps the two newest of the iteration.
    pub(super) fn write_checkpoint(&mut self, k: u32, step: u64) -> Result<(), TrainError> {
        let started = Instant::now();
        let key = checkpoint::key(k, step);
        let mut tensors = BTreeMap::new();
        for (name, moments) in self.optimizer.moments() {
            let n = moments.m.dims()[0];
            tensors.insert(format!("{name}.m"), (vec![n], to_vec(moments.m.clone())));
            tensors.insert(format!("{name}.v"), (vec![n], to_vec(moments.v.clone())));
        }
        let moments = safetensors_bytes(&tensors, None)?;
        let state = CheckpointState {
            iteration: k,
            step,
            optimizer_steps: self.optimizer.steps_taken(),
            skipped_steps: self.skipped_steps,
        };
        let state = serde_json::to_vec_pretty(&state)
            .map_err(|e| TrainError::Input(format!("checkpoint state of {key}: {e}")))?;
        // Written in a temporary folder that replaces the key only once it is complete, its
        // manifest published and the job's fence still lists this worker.
        self.store
            .publish_dir(&key, |dir| -> Result<(), TrainError> {
                self.theta
                    .save(&self.unet_config, &dir.join(checkpoint::WEIGHTS))?;
                let path = dir.join(checkpoint::OPTIMIZER);
                std::fs::write(&path, &moments).map_err(|e| TrainError::io(&path, e))?;
                let path = dir.join(checkpoint::STATE);
                std::fs::write(&path, &state).map_err(|e| TrainError::io(&path, e))?;
                spin_common::manifest::publish(dir, &format!("checkpoint of {key}"))
                    .map_err(|e| TrainError::Input(e.to_string()))?;
                Ok(())
            })
            .map_err(store_error)?;
        let parent = checkpoint::iteration_dir(k);
        let names = self.store.list(&parent).map_err(store_error)?;
        for old in policy::checkpoints_to_remove(&names, policy::CHECKPOINTS_KEPT) {
            self.store
                .remove(&format!("{parent}/{old}"))
                .map_err(store_error)?;
        }
        tracing::info!(
            iteration = k,
            step,
            secs = started.elapsed().as_secs_f64(),
            "checkpoint published"
        );
        Ok(())
    }

    /// Loads the checkpoint after `step` of iteration `k` (verified) into theta and the
    /// optimizer. A newer damaged checkpoint is never read; an older one is not a substitute:
    /// the coordinator chose `step`.
    pub(super) fn load_checkpoint(&mut self, k: u32, step: u64) -> Result<(), TrainError> {
        let (found, refused) = checkpoint::latest_at_most(self.store.root(), k, step);
        for (dir, reason) in &refused {
            tracing::warn!(dir = %dir.display(), %reason, "checkpoint refused");
        }
        let found = found.filter(|f| f.state.step == step).ok_or_else(|| {
            TrainError::Input(format!(
                "no verified checkpoint of iteration {k} after step {step} in {}{}",
                self.store
                    .root()
                    .join(checkpoint::iteration_dir(k))
                    .display(),
                refused
                    .first()
                    .map(|(_, r)| format!(" (newest refused: {r})"))
                    .unwrap_or_default()
            ))
        })?;
        let train_device = self.device.clone().autodiff();
        let (theta, _) =
            UNet2DConditionModel::load(&found.dir.join(checkpoint::WEIGHTS), &train_device)?;
        let file = WeightFile::open(&found.dir.join(checkpoint::OPTIMIZER))?;
        let mut moments = std::collections::HashMap::new();
        for key in file.keys() {
            if let Some(name) = key.strip_suffix(".m") {
                let m = file.tensor::<1>(key, &self.device)?;
                let v = file.tensor::<1>(&format!("{name}.v"), &self.device)?;
                moments.insert(name.to_string(), Moments { m, v });
            }
        }
        self.theta = theta;
        self.optimizer = AdamW::from_state(
            self.optimizer_config(),
            found.state.optimizer_steps,
            moments,
        );
        self.skipped_steps = found.state.skipped_steps;
        self.position = Some(Position::at(k, step + 1));
        tracing::info!(iteration = k, step, dir = %found.dir.display(), "resumed from checkpoint");
        Ok(())
    }

    /// theta_{k+1} becomes the opponent and the reference (DPO keeps the base as reference).
    pub(super) fn finish_iteration(&mut self, k: u32) {
        if policy::reference_follows(self.spec.training.objective, k + 1) {
            self.pipeline.unet = self.theta.valid();
        }
        self.reference_iteration = k + 1;
        self.position = Some(Position::at(k + 1, 0));
        self.opponents = None;
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_job::{prepared, theta_bytes, train_alone, Shape, ToyJob};

    #[test]
    fn a_fresh_replica_resumes_from_the_checkpoint_to_the_same_weights() {
        let shape = Shape {
            steps: 3,
            checkpoint_every: 1,
            ..Shape::default()
        };
        let job = ToyJob::new("checkpoint-resume", &shape);
        let mut first = job.runner();
        prepared(&mut first);
        train_alone(&mut first, 0, 1).expect("steps 0 and 1");
        // A new replica (a restarted worker) starts at step 2 from the checkpoint after 1.
        let mut second = job.runner();
        train_alone(&mut second, 2, 2).expect("step 2 from the checkpoint");
        train_alone(&mut first, 2, 2).expect("step 2 in place");
        assert!(
            theta_bytes(&first) == theta_bytes(&second),
            "replicas differ"
        );
        // Retention: after steps 0, 1, 2 only the two newest checkpoints remain.
        let kept = first
            .store()
            .list(&spin_common::checkpoint::iteration_dir(0))
            .expect("list");
        assert_eq!(kept, vec!["step-00000001", "step-00000002"]);
    }
}
