//! The snapshot task: theta_{k+1} written in diffusers layout beside copies of the base's
//! frozen parts, published by a sha256 manifest, then evaluated.

use std::path::{Path, PathBuf};

use spin_common::store::layout;

use super::policy::{self, SnapshotSource};
use super::{store_error, JobRunner, Metrics};
use crate::models::unet_2d_condition::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::train::TrainError;

impl JobRunner {
    /// Writes theta_{k+1} (diffusers layout beside copies of the base's frozen parts, then a
    /// sha256 manifest) and evaluates it. Returns the snapshot folder and the metrics.
    pub fn snapshot(&mut self, k: u32) -> Result<(PathBuf, Metrics), TrainError> {
        let (_, _, steps) = self.iteration_plan(k as usize)?;
        if let SnapshotSource::LastCheckpoint { step } =
            policy::snapshot_source(self.position, k, steps)
        {
            self.restore_theta_k(k)?;
            self.load_checkpoint(k, step)?;
            self.finish_iteration(k);
        }
        let description = format!("theta_{} of job {}", k + 1, self.spec.name);
        let dir = self
            .store
            .publish_dir(&layout::snapshot(k + 1), |dir| {
                write_snapshot(
                    &self.spec.base_model,
                    &self.theta,
                    &self.unet_config,
                    dir,
                    &description,
                )
            })
            .map_err(store_error)?;
        let metrics = self.evaluate(k as usize + 1, &mut |_, _| {})?;
        Ok((dir, metrics))
    }
}

/// Writes theta in diffusers layout beside copies of the base's frozen parts into the empty
/// folder `dir`, then a sha256 manifest: a folder without a valid manifest is never loaded.
fn write_snapshot(
    base: &Path,
    theta: &UNet2DConditionModel,
    config: &UNet2DConditionConfig,
    dir: &Path,
    description: &str,
) -> Result<(), TrainError> {
    for entry in [
        "model_index.json",
        "text_encoder",
        "tokenizer",
        "scheduler",
        "vae",
    ] {
        copy_recursive(&base.join(entry), &dir.join(entry))?;
    }
    theta.save(config, &dir.join("unet"))?;
    spin_common::manifest::publish(dir, description)
        .map_err(|e| TrainError::Input(e.to_string()))?;
    Ok(())
}

fn copy_recursive(from: &Path, to: &Path) -> Result<(), TrainError> {
    if from.is_dir() {
        std::fs::create_dir_all(to).map_err(|e| TrainError::io(to, e))?;
        for entry in std::fs::read_dir(from).map_err(|e| TrainError::io(from, e))? {
            let entry = entry.map_err(|e| TrainError::io(from, e))?;
            copy_recursive(&entry.path(), &to.join(entry.file_name()))?;
        }
    } else if from.exists()
        && from
            .file_name()
            .is_some_and(|n| n != spin_common::manifest::MANIFEST)
    {
        std::fs::copy(from, to).map_err(|e| TrainError::io(from, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::test_job::{prepared, theta_bytes, train_alone, Shape, ToyJob};

    #[test]
    fn a_replica_that_did_not_train_snapshots_the_same_theta_from_the_last_checkpoint() {
        let job = ToyJob::new("snapshot", &Shape::default());
        let mut trained = job.runner();
        prepared(&mut trained);
        train_alone(&mut trained, 0, 1).expect("the iteration");
        let mut late = job.runner();
        let (dir, metrics) = late.snapshot(0).expect("snapshot from the checkpoint");
        assert!(
            theta_bytes(&late) == theta_bytes(&trained),
            "theta_1 differs"
        );
        spin_common::manifest::verify(&dir).expect("the snapshot's manifest verifies");
        assert_eq!(metrics.iteration, 1);
        assert!(metrics.held_out_loss.is_finite());
    }
}
