//! The train task: optimizer steps `first..=last` of an iteration as one rank of a ring.
//! Micro-batch `m` goes to rank `m mod world`; gradients, the loss and one failure slot per
//! rank ride one all-reduce, so every replica takes the same step or drops the same step.
//! The micro-batches themselves are built in [`super::batch`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use burn::module::Module;
use spin_common::plan::{step_examples, StepShape};
use spin_common::spec::LrShape;

use super::policy::{self, NonFiniteAction, Position};
use super::JobRunner;
use crate::collective::Collective;
use crate::train::objectives::{loss_and_grads, ObjectiveConfig};
use crate::train::{LrSchedule, ParamGrads, TrainError};

/// One optimizer step as every replica applied it.
#[derive(Clone, Debug)]
pub struct StepReport {
    /// Iteration.
    pub iteration: usize,
    /// Step within the iteration, from 0.
    pub step: u64,
    /// Steps in the iteration.
    pub steps: u64,
    /// Mean loss over the global batch.
    pub loss: f64,
    /// Learning rate used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Pairs of the global batch per second of this step.
    pub images_per_sec: f64,
    /// Wall time of the step on this replica.
    pub step_time_s: f64,
    /// Why the step was dropped on every replica (non-finite, policy `skip`), if it was.
    pub skipped: Option<String>,
}

/// Why a train task stopped before its last step, and how far it got.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct TrainFailure {
    /// What went wrong.
    pub error: TrainError,
    /// Steps applied before it (the replica is at that step boundary).
    pub completed: u64,
    /// Whether redoing the remaining steps (on a re-formed ring) may succeed.
    pub retryable: bool,
}

/// A step's outcome, identical on every replica.
enum StepOutcome {
    Applied(StepReport),
    Skipped(StepReport, String),
}

impl JobRunner {
    /// The objective and learning-rate schedule of iteration `k`.
    pub(super) fn iteration_plan(
        &self,
        k: usize,
    ) -> Result<(ObjectiveConfig, LrSchedule, u64), TrainError> {
        let iteration = self.spec.iterations.get(k).ok_or_else(|| {
            TrainError::Input(format!(
                "iteration {k} does not exist (the job has {})",
                self.spec.iterations.len()
            ))
        })?;
        let t = &self.spec.training;
        let config = ObjectiveConfig {
            objective: t.objective,
            loss: t.loss,
            weighting: t.weighting,
            noise: t.noise,
            reduction: t.reduction,
            beta: iteration.beta,
            sampling_steps: self.spec.sampling.steps,
        };
        let lr = match t.lr_schedule {
            LrShape::Linear => LrSchedule::Linear {
                lr: iteration.lr,
                warmup: t.warmup_steps,
                total: iteration.steps,
            },
            LrShape::Constant => LrSchedule::Constant {
                lr: iteration.lr,
                warmup: t.warmup_steps,
            },
        };
        Ok((config, lr, iteration.steps))
    }

    /// Runs optimizer steps `first..=last` of iteration `k` as one rank of `collective`: this
    /// rank computes micro-batches `m` with `m mod world == rank`, gradients (with the loss and
    /// a non-finite flag) are averaged over the ring, and every replica applies the same
    /// AdamW step. After the iteration's last step theta becomes theta_k. `cancel` is checked
    /// between steps; `report` gets every step.
    pub fn train_steps(
        &mut self,
        k: u32,
        first: u64,
        last: u64,
        collective: &mut dyn Collective,
        cancel: &AtomicBool,
        mut report: impl FnMut(&StepReport),
    ) -> Result<u64, TrainFailure> {
        let fail = |error: TrainError, completed: u64, retryable: bool| TrainFailure {
            error,
            completed,
            retryable,
        };
        let ki = k as usize;
        let (config, lr, steps) = self.iteration_plan(ki).map_err(|e| fail(e, 0, false))?;
        if last >= steps || first > last {
            return Err(fail(
                TrainError::Input(format!(
                    "steps {first}..={last} are outside iteration {k}'s {steps} steps"
                )),
                0,
                false,
            ));
        }
        let accumulation = self.spec.training.gradient_accumulation;
        let (rank, world) = (collective.rank(), collective.world());
        if world > accumulation {
            return Err(fail(
                TrainError::Input(format!(
                    "a ring of {world} workers is larger than training.gradient_accumulation \
                     = {accumulation}: some workers would have no micro-batch"
                )),
                0,
                false,
            ));
        }
        self.position_at(k, first).map_err(|e| {
            let retryable = matches!(e, TrainError::Io { .. });
            fail(e, 0, retryable)
        })?;
        self.writes_checkpoints = rank == 0;
        self.ensure_train().map_err(|e| fail(e, 0, false))?;
        self.ensure_opponents(k).map_err(|e| fail(e, 0, false))?;
        let mut completed = 0;
        for step in first..=last {
            if cancel.load(Ordering::Relaxed) {
                return Err(fail(
                    TrainError::Input("cancelled".into()),
                    completed,
                    false,
                ));
            }
            let outcome = self
                .train_step(ki, step, steps, &config, &lr, rank, world, collective)
                .map_err(|e| {
                    let retryable = matches!(e, TrainError::Collective(_));
                    fail(e, completed, retryable)
                });
            let outcome = match outcome {
                Ok(o) => o,
                Err(f) => {
                    self.position = Some(Position::at(k, step));
                    return Err(f);
                }
            };
            match outcome {
                StepOutcome::Applied(r) => report(&r),
                StepOutcome::Skipped(mut r, reason) => {
                    let t = &self.spec.training;
                    let action =
                        policy::on_non_finite(t.nonfinite, self.skipped_steps, t.max_skipped_steps);
                    if action == NonFiniteAction::Skip {
                        self.skipped_steps += 1;
                        tracing::warn!(iteration = k, step, %reason, "step dropped on every replica");
                        r.skipped = Some(reason);
                        report(&r);
                    } else {
                        self.position = Some(Position::at(k, step));
                        return Err(fail(
                            TrainError::NonFinite {
                                iteration: ki,
                                step,
                                reason,
                            },
                            completed,
                            false,
                        ));
                    }
                }
            }
            completed += 1;
            self.position = Some(Position::at(k, step + 1));
            let every = self.spec.training.checkpoint_every;
            if policy::checkpoint_due(step, steps, every) && self.writes_checkpoints {
                // The store has already retried what waiting may cure (a full disk): the
                // job fails here naming the path, rather than training on without the
                // checkpoint a snapshot or a resume would need. `spinctl resume` goes on from
                // the last one written once the cause is gone.
                self.write_checkpoint(k, step)
                    .map_err(|e| fail(e, completed, false))?;
            }
        }
        if last + 1 == steps {
            self.finish_iteration(k);
        }
        Ok(completed)
    }

    #[allow(clippy::too_many_arguments)]
    fn train_step(
        &mut self,
        k: usize,
        step: u64,
        steps: u64,
        config: &ObjectiveConfig,
        lr: &LrSchedule,
        rank: usize,
        world: usize,
        collective: &mut dyn Collective,
    ) -> Result<StepOutcome, TrainError> {
        let started = Instant::now();
        let t = &self.spec.training;
        let accumulation = t.gradient_accumulation;
        let shape = StepShape {
            world: 1,
            batch: t.batch_size,
            accumulation,
        };
        let count = self.train_examples().len();
        let mut total: Option<ParamGrads> = None;
        let mut loss_sum = 0.0f64;
        let mut failure: Option<String> = None;
        for micro in (rank..accumulation).step_by(world) {
            let examples = step_examples(self.spec.seed, k as u64, step, micro, 0, shape, count);
            let batch = self.build_batch(&examples, k, step, micro);
            match loss_and_grads(
                &self.theta,
                &self.pipeline.unet,
                &batch,
                config,
                &self.schedule,
            ) {
                Ok(out) if out.grads.all_finite() => {
                    loss_sum += out.loss;
                    match total.as_mut() {
                        Some(sum) => sum.accumulate(out.grads),
                        None => total = Some(out.grads),
                    }
                }
                Ok(_) => failure = Some(format!("non-finite gradient on rank {rank}")),
                Err(e) => failure = Some(format!("{e} on rank {rank}")),
            }
        }
        // Gradients, the loss sum, then one failure slot per rank: one all-reduce decides for
        // every replica, and every replica can name the ranks that failed.
        let mut flat = match (&total, &failure) {
            (Some(grads), None) => grads.to_flat(),
            _ => vec![0.0; self.theta.num_params()],
        };
        flat.push(loss_sum as f32);
        flat.extend((0..world).map(|r| {
            if r == rank && failure.is_some() {
                1.0
            } else {
                0.0
            }
        }));
        collective.all_reduce_mean(&mut flat)?;
        let slots = flat.split_off(flat.len() - world);
        let failed_ranks: Vec<usize> = (0..world).filter(|&r| slots[r] != 0.0).collect();
        let flag = if failed_ranks.is_empty() { 0.0 } else { 1.0 };
        let loss_mean =
            f64::from(flat.pop().unwrap_or(f32::NAN)) * world as f64 / accumulation as f64;
        let rate = lr.lr(step);
        let mut report = StepReport {
            iteration: k,
            step,
            steps,
            loss: loss_mean,
            lr: rate,
            grad_norm: f64::NAN,
            images_per_sec: 0.0,
            step_time_s: 0.0,
            skipped: None,
        };
        let finish = |mut report: StepReport| {
            let elapsed = started.elapsed().as_secs_f64();
            report.step_time_s = elapsed;
            report.images_per_sec = (t.batch_size * accumulation) as f64 / elapsed.max(1e-9);
            report
        };
        // Every rank sees the same flag, so every rank takes the same branch.
        let Some(mut grads) = total.filter(|_| flag == 0.0 && failure.is_none()) else {
            let reason = failure.unwrap_or_else(|| {
                format!("a non-finite loss or gradient on rank(s) {failed_ranks:?}")
            });
            return Ok(StepOutcome::Skipped(finish(report), reason));
        };
        grads.set_flat(&flat);
        grads.scale(world as f64 / accumulation as f64);
        if !grads.all_finite() {
            return Ok(StepOutcome::Skipped(
                finish(report),
                "non-finite averaged gradient".into(),
            ));
        }
        report.grad_norm = if t.max_grad_norm > 0.0 {
            grads.clip_global_norm(t.max_grad_norm)
        } else {
            grads.global_norm()
        };
        // Take theta by value for the optimizer; the placeholder (a cheap handle on theta_k's
        // tensors) is overwritten at once.
        let theta = std::mem::replace(&mut self.theta, self.pipeline.unet.clone());
        self.theta = self.optimizer.step(theta, &grads, rate);
        Ok(StepOutcome::Applied(finish(report)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_job::{prepared, theta_bytes, train_alone, Shape, ToyJob};

    #[test]
    fn steps_outside_the_iteration_are_refused_before_any_work() {
        let job = ToyJob::new("train-range", &Shape::default());
        let mut runner = job.runner();
        let err = train_alone(&mut runner, 1, 5).expect_err("steps 1..=5 of 2");
        assert_eq!(err.completed, 0);
        assert!(!err.retryable);
        assert!(
            err.to_string().contains("outside iteration 0's 2 steps"),
            "{err}"
        );
    }

    #[test]
    fn steps_alone_report_every_step_and_move_theta() {
        let job = ToyJob::new("train-steps", &Shape::default());
        let mut runner = job.runner();
        prepared(&mut runner);
        let before = theta_bytes(&runner);
        let (done, reports) = train_alone(&mut runner, 0, 1).expect("two steps");
        assert_eq!(done, 2);
        let steps: Vec<u64> = reports.iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![0, 1]);
        assert!(reports
            .iter()
            .all(|r| r.loss.is_finite() && r.skipped.is_none() && r.steps == 2));
        assert_ne!(before, theta_bytes(&runner), "theta did not move");
    }
}
