//! The journal: every accepted job and every transition, in an embedded `redb` database, so a
//! restarted coordinator resumes its jobs where they were. A transition is checked by
//! [`transition`] and written with the job's new state in one database transaction; the
//! transitions are the job's history, so a failed job's [`failed_in`] phase is read from them. Every
//! job event is kept too (prost-encoded `JobEvent`s keyed by job and sequence), so a restarted
//! coordinator's event logs go on from the sequence they reached.

use std::path::{Path, PathBuf};

use prost::Message;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use spin_common::ids::JobId;
use spin_common::proto::v1;

use crate::state::{transition, JobShape, JobState, TransitionError, Trigger};

/// Job id -> [`JobRecord`] as JSON.
const JOBS: TableDefinition<u128, &[u8]> = TableDefinition::new("jobs");
/// (job id, sequence) -> [`TransitionRecord`] as JSON.
const TRANSITIONS: TableDefinition<(u128, u64), &[u8]> = TableDefinition::new("transitions");
/// (job id, event sequence) -> `v1::JobEvent`, prost-encoded.
const EVENTS: TableDefinition<(u128, u64), &[u8]> = TableDefinition::new("events");

/// A job as the journal holds it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Its id.
    pub id: JobId,
    /// Human name from the spec.
    pub name: String,
    /// The spec as submitted, TOML text.
    pub spec_toml: String,
    /// What the state machine needs of the spec.
    pub shape: JobShape,
    /// Where the job is.
    pub state: JobState,
    /// Unix milliseconds.
    pub submitted_at_ms: i64,
    /// Unix milliseconds of the last transition.
    pub updated_at_ms: i64,
    /// Why it failed (`Failed` only).
    pub error: Option<String>,
    /// Transitions so far (the next one's sequence number).
    pub transitions: u64,
}

impl JobRecord {
    /// A freshly accepted, pending job.
    pub fn pending(
        id: JobId,
        name: String,
        spec_toml: String,
        shape: JobShape,
        at_ms: i64,
    ) -> Self {
        Self {
            id,
            name,
            spec_toml,
            shape,
            state: JobState::Pending,
            submitted_at_ms: at_ms,
            updated_at_ms: at_ms,
            error: None,
            transitions: 0,
        }
    }
}

/// One journaled transition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransitionRecord {
    /// Position in the job's history, from 0.
    pub sequence: u64,
    /// State before.
    pub from: JobState,
    /// What happened.
    pub trigger: Trigger,
    /// State after.
    pub to: JobState,
    /// Unix milliseconds.
    pub at_ms: i64,
}

/// Why the journal refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// The database failed.
    #[error("journal {path}: {source}")]
    Database {
        /// The database file.
        path: PathBuf,
        /// What redb said.
        #[source]
        source: Box<redb::Error>,
    },
    /// A stored record does not decode (or a record does not encode).
    #[error("journal {path}: record of job {job}: {source}")]
    Record {
        /// The database file.
        path: PathBuf,
        /// The job.
        job: JobId,
        /// The decoder's reason.
        #[source]
        source: serde_json::Error,
    },
    /// A stored event does not decode.
    #[error("journal {path}: event {sequence} of job {job}: {source}")]
    Event {
        /// The database file.
        path: PathBuf,
        /// The job.
        job: JobId,
        /// The event's sequence number.
        sequence: u64,
        /// The decoder's reason.
        #[source]
        source: prost::DecodeError,
    },
    /// The job id is taken.
    #[error("job {0} is already in the journal")]
    Duplicate(JobId),
    /// No such job.
    #[error("job {0} is not in the journal")]
    UnknownJob(JobId),
    /// The state machine refused the trigger.
    #[error("job {job}: {source}")]
    Transition {
        /// The job.
        job: JobId,
        /// Why.
        #[source]
        source: TransitionError,
    },
}

/// The coordinator's journal.
pub struct Journal {
    path: PathBuf,
    db: Database,
}

impl Journal {
    /// Opens the journal at `path`, creating it (and its tables) if absent.
    pub fn open(path: &Path) -> Result<Self, JournalError> {
        let db = Database::create(path).db(path)?;
        let txn = db.begin_write().db(path)?;
        txn.open_table(JOBS).db(path)?;
        txn.open_table(TRANSITIONS).db(path)?;
        txn.open_table(EVENTS).db(path)?;
        txn.commit().db(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            db,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records a newly accepted job.
    pub fn accept(&self, job: &JobRecord) -> Result<(), JournalError> {
        let bytes = self.encode(job.id, job)?;
        let txn = self.db.begin_write().db(&self.path)?;
        {
            let mut jobs = txn.open_table(JOBS).db(&self.path)?;
            let key = job.id.0.as_u128();
            if jobs.get(key).db(&self.path)?.is_some() {
                return Err(JournalError::Duplicate(job.id));
            }
            jobs.insert(key, bytes.as_slice()).db(&self.path)?;
        }
        txn.commit().db(&self.path)
    }

    /// Applies `trigger` to job `id` at `at_ms`: checks it with the state machine, then stores
    /// the new state and the transition together. A refused trigger writes nothing.
    pub fn apply(
        &self,
        id: JobId,
        trigger: Trigger,
        at_ms: i64,
    ) -> Result<TransitionRecord, JournalError> {
        let txn = self.db.begin_write().db(&self.path)?;
        let record = {
            let mut jobs = txn.open_table(JOBS).db(&self.path)?;
            let key = id.0.as_u128();
            let mut job: JobRecord = match jobs.get(key).db(&self.path)? {
                Some(bytes) => self.decode(id, bytes.value())?,
                None => return Err(JournalError::UnknownJob(id)),
            };
            let to = transition(job.shape, job.state, &trigger)
                .map_err(|source| JournalError::Transition { job: id, source })?;
            match &trigger {
                Trigger::Fail { reason } => job.error = Some(reason.clone()),
                // A resumed job is no longer failed: its old error stays in its history.
                Trigger::Resume { .. } => job.error = None,
                _ => {}
            }
            let record = TransitionRecord {
                sequence: job.transitions,
                from: job.state,
                trigger,
                to,
                at_ms,
            };
            job.state = to;
            job.updated_at_ms = at_ms;
            job.transitions += 1;
            let job_bytes = self.encode(id, &job)?;
            let record_bytes = self.encode(id, &record)?;
            jobs.insert(key, job_bytes.as_slice()).db(&self.path)?;
            let mut transitions = txn.open_table(TRANSITIONS).db(&self.path)?;
            transitions
                .insert((key, record.sequence), record_bytes.as_slice())
                .db(&self.path)?;
            record
        };
        txn.commit().db(&self.path)?;
        Ok(record)
    }

    /// Job `id`, if journaled.
    pub fn job(&self, id: JobId) -> Result<Option<JobRecord>, JournalError> {
        let txn = self.db.begin_read().db(&self.path)?;
        let jobs = txn.open_table(JOBS).db(&self.path)?;
        let found = jobs.get(id.0.as_u128()).db(&self.path)?;
        found
            .map(|bytes| self.decode(id, bytes.value()))
            .transpose()
    }

    /// Every journaled job, oldest submission first.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, JournalError> {
        let txn = self.db.begin_read().db(&self.path)?;
        let table = txn.open_table(JOBS).db(&self.path)?;
        let mut jobs = Vec::new();
        for entry in table.iter().db(&self.path)? {
            let (key, bytes) = entry.db(&self.path)?;
            let id = JobId::from_bytes(key.value().to_be_bytes());
            jobs.push(self.decode::<JobRecord>(id, bytes.value())?);
        }
        jobs.sort_by_key(|j| (j.submitted_at_ms, j.id));
        Ok(jobs)
    }

    /// Jobs not yet done, failed or cancelled: what a restarted coordinator resumes.
    pub fn live_jobs(&self) -> Result<Vec<JobRecord>, JournalError> {
        let mut jobs = self.jobs()?;
        jobs.retain(|j| !j.state.is_terminal());
        Ok(jobs)
    }

    /// Job `id`'s transitions in order.
    pub fn transitions(&self, id: JobId) -> Result<Vec<TransitionRecord>, JournalError> {
        let txn = self.db.begin_read().db(&self.path)?;
        let table = txn.open_table(TRANSITIONS).db(&self.path)?;
        let key = id.0.as_u128();
        let mut out = Vec::new();
        for entry in table.range((key, 0)..=(key, u64::MAX)).db(&self.path)? {
            let (_, bytes) = entry.db(&self.path)?;
            out.push(self.decode(id, bytes.value())?);
        }
        Ok(out)
    }

    /// Stores `events` (each job's, in sequence order) in one database transaction; an event
    /// already stored under the same job and sequence is replaced.
    pub fn append_events(&self, events: &[(JobId, Vec<v1::JobEvent>)]) -> Result<(), JournalError> {
        if events.iter().all(|(_, e)| e.is_empty()) {
            return Ok(());
        }
        let txn = self.db.begin_write().db(&self.path)?;
        {
            let mut table = txn.open_table(EVENTS).db(&self.path)?;
            for (job, events) in events {
                for event in events {
                    let bytes = event.encode_to_vec();
                    table
                        .insert((job.0.as_u128(), event.sequence), bytes.as_slice())
                        .db(&self.path)?;
                }
            }
        }
        txn.commit().db(&self.path)
    }

    /// Job `id`'s stored events, oldest first.
    pub fn events(&self, id: JobId) -> Result<Vec<v1::JobEvent>, JournalError> {
        let txn = self.db.begin_read().db(&self.path)?;
        let table = txn.open_table(EVENTS).db(&self.path)?;
        let key = id.0.as_u128();
        let mut out = Vec::new();
        for entry in table.range((key, 0)..=(key, u64::MAX)).db(&self.path)? {
            let (k, bytes) = entry.db(&self.path)?;
            let sequence = k.value().1;
            let event =
                v1::JobEvent::decode(bytes.value()).map_err(|source| JournalError::Event {
                    path: self.path.clone(),
                    job: id,
                    sequence,
                    source,
                })?;
            out.push(event);
        }
        Ok(out)
    }

    fn encode<T: Serialize>(&self, job: JobId, value: &T) -> Result<Vec<u8>, JournalError> {
        serde_json::to_vec(value).map_err(|source| self.record_error(job, source))
    }

    fn decode<T: for<'de> Deserialize<'de>>(
        &self,
        job: JobId,
        bytes: &[u8],
    ) -> Result<T, JournalError> {
        serde_json::from_slice(bytes).map_err(|source| self.record_error(job, source))
    }

    fn record_error(&self, job: JobId, source: serde_json::Error) -> JournalError {
        JournalError::Record {
            path: self.path.clone(),
            job,
            source,
        }
    }
}

/// The phase a failed job failed in, from its `history` (its transitions in order): the state
/// its newest transition, the one into `Failed`, came from. `None` if the job is not failed.
pub fn failed_in(history: &[TransitionRecord]) -> Option<JobState> {
    history
        .last()
        .filter(|t| t.to == JobState::Failed)
        .map(|t| t.from)
}

/// Attaches the journal's path to any redb error.
trait DbResult<T> {
    fn db(self, path: &Path) -> Result<T, JournalError>;
}

impl<T, E: Into<redb::Error>> DbResult<T> for Result<T, E> {
    fn db(self, path: &Path) -> Result<T, JournalError> {
        self.map_err(|e| JournalError::Database {
            path: path.to_path_buf(),
            source: Box::new(e.into()),
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const SHAPE: JobShape = JobShape {
        iterations: 1,
        self_play: true,
    };

    /// A fresh database path under the system temp folder, removed when dropped.
    struct TempDb(PathBuf);

    impl TempDb {
        fn new(name: &str) -> Self {
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos();
            let dir = std::env::temp_dir().join(format!(
                "spin-journal-{}-{name}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }

        fn path(&self) -> PathBuf {
            self.0.join("journal.redb")
        }
    }

    impl Drop for TempDb {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn job(name: &str, at_ms: i64) -> JobRecord {
        JobRecord::pending(
            JobId::new(),
            name.into(),
            format!("[job]\nname = \"{name}\"\n"),
            SHAPE,
            at_ms,
        )
    }

    #[test]
    fn reopening_the_journal_yields_the_same_jobs_and_states() {
        let tmp = TempDb::new("reopen");
        let (a, b, c) = (job("a", 1), job("b", 2), job("c", 3));
        {
            let journal = Journal::open(&tmp.path()).unwrap();
            for j in [&a, &b, &c] {
                journal.accept(j).unwrap();
            }
            journal.apply(a.id, Trigger::Start, 10).unwrap();
            journal.apply(a.id, Trigger::Prepared, 11).unwrap();
            journal
                .apply(a.id, Trigger::Sampled { iteration: 0 }, 12)
                .unwrap();
            journal
                .apply(
                    b.id,
                    Trigger::Fail {
                        reason: "no workers".into(),
                    },
                    13,
                )
                .unwrap();
            journal.apply(c.id, Trigger::Cancel, 14).unwrap();
        }
        let journal = Journal::open(&tmp.path()).unwrap();
        let jobs = journal.jobs().unwrap();
        assert_eq!(
            jobs.iter().map(|j| (j.id, j.state)).collect::<Vec<_>>(),
            [
                (a.id, JobState::Training(0)),
                (b.id, JobState::Failed),
                (c.id, JobState::Cancelled)
            ]
        );
        let first = &jobs[0];
        assert_eq!(
            (first.name.as_str(), first.spec_toml.as_str()),
            ("a", a.spec_toml.as_str())
        );
        assert_eq!((first.updated_at_ms, first.transitions), (12, 3));
        assert_eq!(jobs[1].error.as_deref(), Some("no workers"));
        assert_eq!(
            journal
                .live_jobs()
                .unwrap()
                .iter()
                .map(|j| j.id)
                .collect::<Vec<_>>(),
            [a.id]
        );
        let history = journal.transitions(a.id).unwrap();
        assert_eq!(
            history
                .iter()
                .map(|t| (t.sequence, t.from, t.to))
                .collect::<Vec<_>>(),
            [
                (0, JobState::Pending, JobState::Preparing),
                (1, JobState::Preparing, JobState::Sampling(0)),
                (2, JobState::Sampling(0), JobState::Training(0)),
            ]
        );
        assert_eq!(journal.transitions(b.id).unwrap().len(), 1);
        // Resuming goes on from the journaled state.
        journal
            .apply(a.id, Trigger::Trained { iteration: 0 }, 20)
            .unwrap();
        assert_eq!(
            journal.job(a.id).unwrap().unwrap().state,
            JobState::Snapshot(0)
        );
    }

    #[test]
    fn a_resumed_job_goes_back_to_the_phase_it_failed_in_across_a_reopen() {
        let tmp = TempDb::new("resume");
        let a = job("a", 1);
        let fail = |reason: &str| Trigger::Fail {
            reason: reason.into(),
        };
        {
            let journal = Journal::open(&tmp.path()).unwrap();
            journal.accept(&a).unwrap();
            journal.apply(a.id, Trigger::Start, 2).unwrap();
            assert_eq!(failed_in(&journal.transitions(a.id).unwrap()), None);
            journal.apply(a.id, Trigger::Prepared, 3).unwrap();
            journal
                .apply(a.id, Trigger::Sampled { iteration: 0 }, 4)
                .unwrap();
            journal.apply(a.id, fail("disk full"), 5).unwrap();
            let history = journal.transitions(a.id).unwrap();
            let phase = failed_in(&history).unwrap();
            assert_eq!(phase, JobState::Training(0));
            let record = journal.apply(a.id, Trigger::Resume { phase }, 6).unwrap();
            assert_eq!(
                (record.from, record.to, record.sequence),
                (JobState::Failed, JobState::Training(0), 4)
            );
        }
        let journal = Journal::open(&tmp.path()).unwrap();
        let job = journal.job(a.id).unwrap().unwrap();
        assert_eq!(
            (job.state, job.error, job.transitions),
            (JobState::Training(0), None, 5)
        );
        assert_eq!(journal.live_jobs().unwrap().len(), 1, "live again");
        let history = journal.transitions(a.id).unwrap();
        assert_eq!(
            history[3].trigger,
            fail("disk full"),
            "the failure stays in the history"
        );
        assert_eq!(failed_in(&history), None, "no longer failed");
        // Failing again, later: resuming goes back to the newer phase.
        journal
            .apply(a.id, Trigger::Trained { iteration: 0 }, 7)
            .unwrap();
        journal.apply(a.id, fail("disk full again"), 8).unwrap();
        let phase = failed_in(&journal.transitions(a.id).unwrap());
        assert_eq!(phase, Some(JobState::Snapshot(0)));
        // A resume naming another phase than a legal one writes nothing.
        let err = journal
            .apply(
                a.id,
                Trigger::Resume {
                    phase: JobState::Done,
                },
                9,
            )
            .unwrap_err();
        assert!(matches!(err, JournalError::Transition { .. }), "{err}");
        assert_eq!(journal.job(a.id).unwrap().unwrap().state, JobState::Failed);
    }

    #[test]
    fn refused_triggers_and_unknown_jobs_write_nothing() {
        let tmp = TempDb::new("refuse");
        let journal = Journal::open(&tmp.path()).unwrap();
        let a = job("a", 1);
        journal.accept(&a).unwrap();
        let err = journal.apply(a.id, Trigger::Prepared, 5).unwrap_err();
        assert!(matches!(err, JournalError::Transition { .. }), "{err}");
        assert!(err.to_string().contains(&a.id.to_string()), "{err}");
        assert_eq!(journal.job(a.id).unwrap().unwrap(), a);
        assert!(journal.transitions(a.id).unwrap().is_empty());

        let stranger = JobId::new();
        assert!(matches!(
            journal.apply(stranger, Trigger::Start, 5),
            Err(JournalError::UnknownJob(id)) if id == stranger
        ));
        assert_eq!(journal.job(stranger).unwrap(), None);
        assert!(matches!(journal.accept(&a), Err(JournalError::Duplicate(id)) if id == a.id));
    }

    #[test]
    fn events_are_kept_per_job_in_sequence_order_across_a_reopen() {
        let tmp = TempDb::new("events");
        let (a, b) = (job("a", 1), job("b", 2));
        let event = |job: &JobRecord, sequence: u64, text: &str| v1::JobEvent {
            job_id: job.id.to_string(),
            sequence,
            at_ms: 7,
            event: Some(v1::job_event::Event::Warning(v1::Warning {
                message: text.into(),
            })),
        };
        {
            let journal = Journal::open(&tmp.path()).unwrap();
            journal.accept(&a).unwrap();
            journal.accept(&b).unwrap();
            journal
                .append_events(&[
                    (a.id, vec![event(&a, 0, "a0"), event(&a, 1, "a1")]),
                    (b.id, vec![event(&b, 0, "b0")]),
                ])
                .unwrap();
            journal
                .append_events(&[(a.id, vec![event(&a, 2, "a2")]), (b.id, Vec::new())])
                .unwrap();
            journal.append_events(&[]).unwrap();
        }
        let journal = Journal::open(&tmp.path()).unwrap();
        assert_eq!(
            journal.events(a.id).unwrap(),
            [event(&a, 0, "a0"), event(&a, 1, "a1"), event(&a, 2, "a2")]
        );
        assert_eq!(journal.events(b.id).unwrap(), [event(&b, 0, "b0")]);
        assert!(journal.events(JobId::new()).unwrap().is_empty());
    }

    #[test]
    fn a_path_that_cannot_be_a_database_is_named() {
        let tmp = TempDb::new("bad");
        // A folder where the file should be.
        let err = Journal::open(&tmp.0).err().unwrap();
        assert!(
            err.to_string().contains(&tmp.0.display().to_string()),
            "{err}"
        );
    }
}
