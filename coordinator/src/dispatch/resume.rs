//! Going on with a job from what its store holds: after a coordinator restart, or when a
//! failed job is resumed on request (`ResumeJob`, back into the phase it failed in), the job
//! re-enters its journaled phase ([`JobRun::resume`](super::JobRun::resume)), and after every
//! replica of a ring was lost, training goes on from the latest verified checkpoint
//! ([`JobRun::restore`](super::JobRun::restore)). [`survey`] and [`survey_training`] read the
//! store (the only reads of it in dispatch; the coordinator calls them off its lock, since
//! verifying a checkpoint hashes its files); what they found is plain data.

use std::path::{Path, PathBuf};

use spin_common::checkpoint;
use spin_common::manifest::{self, ManifestError};
use spin_common::store::layout;

use super::Plan;
use crate::state::JobState;

/// What the store holds of a job interrupted in some phase.
#[derive(Clone, Debug, PartialEq)]
pub enum Found {
    /// Preparing or sampling: the shards whose output file exists (for preparing, the index
    /// after the training shards is the held-out one).
    Shards {
        /// Shard indices, ascending.
        done: Vec<u32>,
    },
    /// Training: where the iteration goes on.
    Training(TrainingPoint),
    /// Snapshot k: whether theta_{k+1} is published.
    Snapshot {
        /// Its folder.
        dir: PathBuf,
        /// `Ok` if it verifies; else `None` when it was never published, or why it does not
        /// verify.
        verified: Result<(), Option<String>>,
    },
    /// Nothing to look for (pending or ended).
    Nothing,
}

/// Where training of one iteration goes on, by the store.
#[derive(Clone, Debug, PartialEq)]
pub struct TrainingPoint {
    /// Iteration k.
    pub iteration: u32,
    /// The newest verified checkpoint (folder, its step); `None`: there is none, and training
    /// starts over from theta_k.
    pub checkpoint: Option<(PathBuf, u64)>,
    /// Newer checkpoints refused (folder, why): torn or corrupt.
    pub refused: Vec<(PathBuf, String)>,
}

impl TrainingPoint {
    /// The first step to run: the one after the checkpoint's, or 0.
    pub fn next_step(&self) -> u64 {
        self.checkpoint.as_ref().map_or(0, |(_, step)| step + 1)
    }
}

/// What the store under `plan.job_dir` holds for a job in `state`.
pub fn survey(plan: &Plan, state: JobState) -> Found {
    let dir = &plan.job_dir;
    let train = plan.train_shards();
    let written = |key: String| dir.join(key).is_file();
    match state {
        JobState::Preparing => {
            let mut done: Vec<u32> = (0..train)
                .filter(|&n| written(layout::latents(n)))
                .collect();
            if plan.held_out && written(layout::held_out()) {
                done.push(train);
            }
            Found::Shards { done }
        }
        JobState::Sampling(k) => Found::Shards {
            done: (0..train)
                .filter(|&n| written(layout::opponents(k, n)))
                .collect(),
        },
        JobState::Training(k) => Found::Training(survey_training(dir, k)),
        JobState::Snapshot(k) => {
            let snapshot = dir.join(layout::snapshot(k + 1));
            let verified = match manifest::verify(&snapshot) {
                Ok(_) => Ok(()),
                Err(ManifestError::Unpublished(_)) => Err(None),
                Err(err) => Err(Some(err.to_string())),
            };
            Found::Snapshot {
                dir: snapshot,
                verified,
            }
        }
        JobState::Pending | JobState::Done | JobState::Failed | JobState::Cancelled => {
            Found::Nothing
        }
    }
}

/// Where training of iteration `k` goes on by the checkpoints under `job_dir`.
pub fn survey_training(job_dir: &Path, k: u32) -> TrainingPoint {
    let (found, refused) = checkpoint::latest_verified(job_dir, k);
    TrainingPoint {
        iteration: k,
        checkpoint: found.map(|f| (f.dir, f.state.step)),
        refused,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use spin_common::checkpoint::CheckpointState;
    use spin_common::shards::plan_shards;

    use super::*;

    /// A job folder under the system temp folder, removed when dropped.
    struct TempJob(PathBuf);

    impl TempJob {
        fn new(name: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir()
                .join(format!("spin-resume-{}-{name}-{nanos}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        /// A plan of 10 prompts in shards of 3 (4 shards) over this folder.
        fn plan(&self, held_out: bool) -> Plan {
            Plan {
                seed: 1,
                steps: vec![6, 4],
                shards: plan_shards(10, 3).unwrap(),
                held_out,
                job_dir: self.0.clone(),
                max_world: usize::MAX,
            }
        }

        fn file(&self, key: &str) {
            let path = self.0.join(key);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"safetensors").unwrap();
        }

        /// A published checkpoint after `step` of iteration `k`.
        fn checkpoint(&self, k: u32, step: u64) -> PathBuf {
            let dir = self.0.join(checkpoint::key(k, step));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join(checkpoint::WEIGHTS), format!("theta {step}")).unwrap();
            let state = CheckpointState {
                iteration: k,
                step,
                optimizer_steps: step + 1,
                skipped_steps: 0,
            };
            std::fs::write(
                dir.join(checkpoint::STATE),
                serde_json::to_string(&state).unwrap(),
            )
            .unwrap();
            manifest::publish(&dir, "test checkpoint").unwrap();
            dir
        }
    }

    impl Drop for TempJob {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn encode_shards_with_a_cache_file_are_done_the_held_out_one_included() {
        let job = TempJob::new("prepare");
        let plan = job.plan(true);
        assert_eq!(
            survey(&plan, JobState::Preparing),
            Found::Shards { done: vec![] }
        );
        job.file(&layout::latents(0));
        job.file(&layout::latents(2));
        job.file(&layout::held_out());
        // A temporary file of an interrupted write is not a shard.
        job.file("cache/latents/shard-00001.safetensors.tmp-1");
        assert_eq!(
            survey(&plan, JobState::Preparing),
            Found::Shards {
                done: vec![0, 2, 4]
            }
        );
        // Without held-out prompts the file is no shard of the plan.
        assert_eq!(
            survey(&job.plan(false), JobState::Preparing),
            Found::Shards { done: vec![0, 2] }
        );
    }

    #[test]
    fn sampling_shards_count_only_the_iterations_own_opponents() {
        let job = TempJob::new("sample");
        let plan = job.plan(true);
        job.file(&layout::opponents(0, 0));
        job.file(&layout::opponents(0, 1));
        job.file(&layout::opponents(0, 3));
        job.file(&layout::opponents(1, 2));
        job.file(&layout::latents(2));
        assert_eq!(
            survey(&plan, JobState::Sampling(0)),
            Found::Shards {
                done: vec![0, 1, 3]
            }
        );
        assert_eq!(
            survey(&plan, JobState::Sampling(1)),
            Found::Shards { done: vec![2] }
        );
    }

    #[test]
    fn training_resumes_after_the_newest_verified_checkpoint() {
        let job = TempJob::new("train");
        let none = survey_training(&job.0, 0);
        assert_eq!((none.checkpoint.clone(), none.next_step()), (None, 0));
        assert!(none.refused.is_empty());
        job.checkpoint(0, 1);
        let three = job.checkpoint(0, 3);
        job.checkpoint(1, 0);
        let Found::Training(point) = survey(&job.plan(true), JobState::Training(0)) else {
            panic!("not a training point")
        };
        assert_eq!(point.checkpoint, Some((three, 3)));
        assert_eq!(point.next_step(), 4);
        assert!(point.refused.is_empty());
        assert_eq!(survey_training(&job.0, 1).next_step(), 1);
        assert_eq!(survey_training(&job.0, 2).next_step(), 0);
    }

    #[test]
    fn torn_or_corrupt_newer_checkpoints_are_skipped_with_the_reason() {
        let job = TempJob::new("torn");
        let one = job.checkpoint(0, 1);
        let corrupt = job.checkpoint(0, 4);
        std::fs::write(corrupt.join(checkpoint::WEIGHTS), "flipped bits").unwrap();
        // A writer that died before publishing: files, no manifest.
        let torn = job.0.join(checkpoint::key(0, 5));
        std::fs::create_dir_all(&torn).unwrap();
        std::fs::write(torn.join(checkpoint::WEIGHTS), "half").unwrap();
        let point = survey_training(&job.0, 0);
        assert_eq!(point.checkpoint, Some((one, 1)));
        assert_eq!(point.next_step(), 2);
        let refused: Vec<&PathBuf> = point.refused.iter().map(|(d, _)| d).collect();
        assert_eq!(refused, [&torn, &corrupt], "newest first");
        assert!(
            point.refused[0].1.contains("never published"),
            "{}",
            point.refused[0].1
        );
        assert!(
            point.refused[1].1.contains(checkpoint::WEIGHTS),
            "{}",
            point.refused[1].1
        );
        // Nothing verifies: training starts over, and both are still named.
        std::fs::write(
            job.0.join(checkpoint::key(0, 1)).join(checkpoint::STATE),
            "{}",
        )
        .unwrap();
        let point = survey_training(&job.0, 0);
        assert_eq!((point.checkpoint, point.refused.len()), (None, 3));
    }

    #[test]
    fn a_snapshot_counts_only_if_it_verifies() {
        let job = TempJob::new("snapshot");
        let plan = job.plan(true);
        let dir = job.0.join(layout::snapshot(1));
        assert_eq!(
            survey(&plan, JobState::Snapshot(0)),
            Found::Snapshot {
                dir: dir.clone(),
                verified: Err(None)
            }
        );
        std::fs::create_dir_all(dir.join("unet")).unwrap();
        std::fs::write(dir.join("unet/diffusion_pytorch_model.safetensors"), "w").unwrap();
        manifest::publish(&dir, "theta_1").unwrap();
        assert_eq!(
            survey(&plan, JobState::Snapshot(0)),
            Found::Snapshot {
                dir: dir.clone(),
                verified: Ok(())
            }
        );
        std::fs::write(dir.join("unet/diffusion_pytorch_model.safetensors"), "x").unwrap();
        let Found::Snapshot {
            verified: Err(Some(reason)),
            ..
        } = survey(&plan, JobState::Snapshot(0))
        else {
            panic!("a corrupt snapshot verified")
        };
        assert!(reason.contains("does not match"), "{reason}");
        assert_eq!(survey(&plan, JobState::Pending), Found::Nothing);
    }
}
