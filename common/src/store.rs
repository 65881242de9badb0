//! The object store of a job's artifacts: cached latents, opponent samples, checkpoints,
//! snapshots, sample grids and metrics. A local directory (or `file://` URL) is the store
//! this build ships; every worker and the coordinator must see the same directory (one
//! machine, or a shared filesystem). Writes are atomic: an object (or a whole folder, with
//! [`Store::publish_dir`]) is written under a temporary name, synced and renamed, so a reader
//! never sees half an object; the temporary is removed when the write fails.
//!
//! Fencing: a worker writes through a store fenced with its registration ([`Store::fenced`]).
//! Before each rename it reads the job's fence ([`layout::fence`], written by the coordinator
//! whenever the job's workers change) and refuses to publish unless the fence lists it, so a
//! worker the coordinator dropped (partitioned, frozen, replaced) cannot overwrite what the
//! job's current workers write. The check and the rename are two steps on a shared
//! filesystem: a worker dropped between them (a window of one rename) still lands its write.
//!
//! A full disk (`ENOSPC`, quota) and transient errors (interrupted, timed out) are retried
//! with exponential backoff ([`Retry`]); each retry is logged and handed to the store's
//! warning hook (a worker reports it to the coordinator as a job warning naming the path).
//!
//! Keys are `/`-separated relative paths; [`layout`] names every key of a job.

use std::io::Write;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Why a store operation failed; names the key and the directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The location is not a store this build can open.
    #[error("object store `{location}`: {reason}")]
    Location {
        /// What was given.
        location: String,
        /// Why it cannot be used.
        reason: String,
    },
    /// A key that would leave the store (absolute, `..`, empty).
    #[error("object key `{0}` is not a relative path inside the store")]
    Key(String),
    /// The filesystem refused.
    #[error("object `{key}` in {root}: {source}")]
    Io {
        /// The key.
        key: String,
        /// The store's directory.
        root: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The writer of a folder failed.
    #[error("object `{key}` in {root}: {source}")]
    Write {
        /// The folder's key.
        key: String,
        /// The store's directory.
        root: PathBuf,
        /// What the writer said.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The job's fence does not list this writer: the coordinator dropped it.
    #[error(
        "write of `{key}` refused: worker {writer} is fenced off this job ({fence} does not \
         list it{generation}); the coordinator has dropped it and handed its work to others"
    )]
    Fenced {
        /// The key that was not published.
        key: String,
        /// The writer's registration.
        writer: String,
        /// The fence file.
        fence: PathBuf,
        /// `", generation N"` when the fence could be read.
        generation: String,
    },
}

impl StoreError {
    /// Whether waiting may cure it: a full disk or quota, an interrupted or timed-out call.
    pub fn is_transient(&self) -> bool {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = match self {
            Self::Io { source, .. } => Some(source),
            Self::Write { source, .. } => Some(source.as_ref()),
            _ => None,
        };
        while let Some(err) = cause {
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                use std::io::ErrorKind as K;
                return matches!(
                    io.kind(),
                    K::StorageFull | K::QuotaExceeded | K::Interrupted | K::TimedOut
                );
            }
            cause = err.source();
        }
        false
    }
}

/// How a transient store error is retried: `attempts` in all, waiting `first_backoff`
/// before the second, doubling up to `max_backoff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Attempts in all (1: no retry).
    pub attempts: u32,
    /// The wait before the first retry.
    pub first_backoff: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
}

impl Default for Retry {
    /// Six attempts over about a quarter of a minute (waits of 0.5, 1, 2, 4 and 8 s): long
    /// enough for a cleaner to free space, well short of a task deadline.
    fn default() -> Self {
        Self {
            attempts: 6,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(8),
        }
    }
}

/// A transient failure the store is about to retry.
#[derive(Clone, Debug)]
pub struct StoreWarning {
    /// The path that could not be written.
    pub path: PathBuf,
    /// What failed.
    pub error: String,
    /// The attempt that failed (1-based) and the attempts in all.
    pub attempt: u32,
    /// Attempts in all.
    pub attempts: u32,
    /// The wait before the next attempt.
    pub backoff: Duration,
}

impl std::fmt::Display for StoreWarning {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "writing {} failed ({}); attempt {} of {}, retrying in {:.1} s",
            self.path.display(),
            self.error,
            self.attempt,
            self.attempts,
            self.backoff.as_secs_f64()
        )
    }
}

/// Called with each retried failure.
pub type WarningHook = Arc<dyn Fn(&StoreWarning) + Send + Sync>;

/// The writer a fenced store publishes for, and the fence it checks.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Fence {
    writer: String,
    file: PathBuf,
}

/// The job's fence as the coordinator writes it at [`layout::fence`]: the registrations
/// allowed to publish, and a generation that grows with every change.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FenceRecord {
    /// Bumped at every rewrite.
    pub generation: u64,
    /// The worker registrations (ids) that may publish.
    pub writers: Vec<String>,
}

impl FenceRecord {
    /// The fence at `path`; `None` if absent or unreadable.
    pub fn read(path: &Path) -> Option<Self> {
        let bytes = std::fs::read(path).ok()?;
        serde_json::from_slice(&bytes).ok()
    }
}

/// A store rooted at a local directory.
#[derive(Clone)]
pub struct Store {
    root: PathBuf,
    fence: Option<Fence>,
    retry: Retry,
    warn: Option<WarningHook>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("root", &self.root)
            .field("fence", &self.fence)
            .field("retry", &self.retry)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens `location`: a directory path or a `file://` URL (created if absent). Cloud URLs
    /// (`s3://`, `gs://`, `az://`) are refused with a message saying so.
    pub fn open(location: &str) -> Result<Self, StoreError> {
        let refuse = |reason: String| StoreError::Location {
            location: location.to_string(),
            reason,
        };
        let path = match location.split_once("://") {
            None => PathBuf::from(location),
            Some(("file", rest)) => PathBuf::from(rest),
            Some((scheme, _)) => {
                return Err(refuse(format!(
                    "scheme `{scheme}` is not supported by this build; use a directory shared by \
                     the coordinator and the workers"
                )))
            }
        };
        if path.as_os_str().is_empty() {
            return Err(refuse("empty path".into()));
        }
        std::fs::create_dir_all(&path).map_err(|e| refuse(e.to_string()))?;
        let root = std::path::absolute(&path).map_err(|e| refuse(e.to_string()))?;
        Ok(Self {
            root,
            fence: None,
            retry: Retry::default(),
            warn: None,
        })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store under `prefix` (a job's objects), with this one's fence, retry and hook.
    pub fn sub(&self, prefix: &str) -> Result<Self, StoreError> {
        let root = self.path(prefix)?;
        std::fs::create_dir_all(&root).map_err(|e| self.io(prefix, e))?;
        Ok(Self {
            root,
            ..self.clone()
        })
    }

    /// This store (a job's), publishing only while the job's fence ([`layout::fence`] under
    /// its root) lists `writer`.
    pub fn fenced(self, writer: &str) -> Self {
        let file = self.root.join(layout::fence());
        Self {
            fence: Some(Fence {
                writer: writer.to_string(),
                file,
            }),
            ..self
        }
    }

    /// This store retrying transient failures as `retry` says.
    pub fn with_retry(self, retry: Retry) -> Self {
        Self { retry, ..self }
    }

    /// This store handing each retried failure to `hook` (besides logging it).
    pub fn on_warning(self, hook: WarningHook) -> Self {
        Self {
            warn: Some(hook),
            ..self
        }
    }

    fn io(&self, key: &str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            key: key.to_string(),
            root: self.root.clone(),
            source,
        }
    }

    /// The local path of `key` (for readers of whole folders, such as snapshots).
    pub fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        let relative = Path::new(key);
        let clean = !key.is_empty()
            && relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)));
        if !clean {
            return Err(StoreError::Key(key.to_string()));
        }
        Ok(self.root.join(relative))
    }

    /// A temporary name beside `path`, unique to this process and thread, hidden from
    /// [`Store::list`].
    fn temporary(path: &Path) -> PathBuf {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        path.with_file_name(format!(
            "{name}.tmp-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ))
    }

    /// Refuses a publish at `key` unless the fence (if any) lists this store's writer.
    fn admit(&self, key: &str) -> Result<(), StoreError> {
        let Some(fence) = &self.fence else {
            return Ok(());
        };
        let record = FenceRecord::read(&fence.file);
        if record
            .as_ref()
            .is_some_and(|r| r.writers.contains(&fence.writer))
        {
            return Ok(());
        }
        let err = StoreError::Fenced {
            key: key.to_string(),
            writer: fence.writer.clone(),
            fence: fence.file.clone(),
            generation: record
                .map(|r| format!(", generation {}", r.generation))
                .unwrap_or_default(),
        };
        tracing::warn!(key, writer = %fence.writer, fence = %fence.file.display(), "fenced write refused");
        Err(err)
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retries are spent; each
    /// transient failure is logged and handed to the warning hook, naming `path`.
    fn retrying<T>(
        &self,
        path: &Path,
        mut attempt: impl FnMut() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let attempts = self.retry.attempts.max(1);
        let mut backoff = self.retry.first_backoff;
        for n in 1.. {
            match attempt() {
                Err(err) if n < attempts && err.is_transient() => {
                    let warning = StoreWarning {
                        path: path.to_path_buf(),
                        error: err.to_string(),
                        attempt: n,
                        attempts,
                        backoff,
                    };
                    tracing::warn!(path = %path.display(), error = %err, attempt = n, attempts, "store write failed; retrying");
                    if let Some(hook) = &self.warn {
                        hook(&warning);
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(self.retry.max_backoff);
                }
                other => return other,
            }
        }
        unreachable!("the loop returns")
    }

    /// Writes `bytes` at `key` atomically (temporary file, fsync, fence check, rename); the
    /// temporary file is removed when a step fails. Transient failures are retried.
    pub fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.path(key)?;
        self.retrying(&path, || {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| self.io(key, e))?;
            }
            let tmp = Self::temporary(&path);
            let write = || -> std::io::Result<()> {
                let mut file = std::fs::File::create(&tmp)?;
                file.write_all(bytes)?;
                file.sync_all()
            };
            let published = write()
                .map_err(|e| self.io(key, e))
                .and_then(|()| self.admit(key))
                .and_then(|()| std::fs::rename(&tmp, &path).map_err(|e| self.io(key, e)));
            if published.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            published
        })
    }

    /// Publishes the folder at `key`: `write` fills a temporary folder beside it, which then
    /// replaces `key` (fence checked first). The temporary folder is removed when anything
    /// fails; a transient failure (a full disk) runs `write` again after a backoff. Returns
    /// the folder's path.
    pub fn publish_dir<E>(
        &self,
        key: &str,
        mut write: impl FnMut(&Path) -> Result<(), E>,
    ) -> Result<PathBuf, StoreError>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let path = self.path(key)?;
        self.retrying(&path, || {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|e| self.io(key, e))?;
            }
            let tmp = Self::temporary(&path);
            let _ = std::fs::remove_dir_all(&tmp);
            let published = std::fs::create_dir_all(&tmp)
                .map_err(|e| self.io(key, e))
                .and_then(|()| {
                    write(&tmp).map_err(|e| StoreError::Write {
                        key: key.to_string(),
                        root: self.root.clone(),
                        source: Box::new(e),
                    })
                })
                .and_then(|()| self.admit(key))
                .and_then(|()| {
                    if path.exists() {
                        std::fs::remove_dir_all(&path).map_err(|e| self.io(key, e))?;
                    }
                    std::fs::rename(&tmp, &path).map_err(|e| self.io(key, e))
                });
            if published.is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
            }
            published
        })?;
        Ok(path)
    }

    /// The bytes at `key`.
    pub fn get(&self, key: &str) -> Result<Vec<u8>, StoreError> {
        let path = self.path(key)?;
        std::fs::read(&path).map_err(|e| self.io(key, e))
    }

    /// Whether `key` holds an object or a folder.
    pub fn exists(&self, key: &str) -> bool {
        self.path(key).is_ok_and(|p| p.exists())
    }

    /// Removes the object or folder at `key` (absent is fine).
    pub fn remove(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        let result = if path.is_dir() {
            std::fs::remove_dir_all(&path)
        } else {
            std::fs::remove_file(&path)
        };
        match result {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(self.io(key, e)),
            _ => Ok(()),
        }
    }

    /// Names directly under `prefix` (files and folders), sorted, temporaries left out;
    /// empty if absent.
    pub fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let dir = self.path(prefix)?;
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(prefix, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.io(prefix, e))?;
            if let Some(name) = entry.file_name().to_str() {
                if !name.contains(".tmp-") {
                    names.push(name.to_string());
                }
            }
        }
        names.sort();
        Ok(names)
    }
}

/// The keys of one job's objects, relative to the job's prefix. The local loop writes the
/// same layout under its output folder.
pub mod layout {
    /// Cached latents and text states of training shard `shard`.
    pub fn latents(shard: u32) -> String {
        format!("cache/latents/shard-{shard:05}.safetensors")
    }

    /// Cached latents and text states of the held-out prompts.
    pub fn held_out() -> String {
        "cache/latents/held-out.safetensors".to_string()
    }

    /// Opponent samples of iteration `k`, shard `shard`.
    pub fn opponents(k: u32, shard: u32) -> String {
        format!("cache/opponents/iteration-{k}/shard-{shard:05}.safetensors")
    }

    /// theta_{k} in diffusers layout with its manifest (k >= 1).
    pub fn snapshot(k: u32) -> String {
        format!("iteration-{k}")
    }

    /// Evaluation of theta_k (k = 0: the base model).
    pub fn eval(k: u32) -> String {
        format!("eval-{k}")
    }

    /// Checkpoints of training.
    pub fn checkpoints() -> String {
        "checkpoints".to_string()
    }

    /// All evaluations of the job, JSON.
    pub fn metrics() -> String {
        "metrics.json".to_string()
    }

    /// The job's fence: the worker registrations that may publish
    /// ([`FenceRecord`](super::FenceRecord), JSON), written by the coordinator.
    pub fn fence() -> String {
        "fence.json".to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("spin-store-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn objects_round_trip_and_list_in_order() {
        let dir = temp("rt");
        let store = Store::open(dir.to_str().unwrap()).unwrap();
        store.put("a/b/2.bin", b"two").unwrap();
        store.put("a/b/1.bin", b"one").unwrap();
        assert_eq!(store.get("a/b/1.bin").unwrap(), b"one");
        assert_eq!(store.list("a/b").unwrap(), ["1.bin", "2.bin"]);
        assert!(store.list("nothing").unwrap().is_empty());
        let job = store.sub("jobs/x").unwrap();
        job.put("k", b"v").unwrap();
        assert_eq!(store.get("jobs/x/k").unwrap(), b"v");
        store.remove("a").unwrap();
        assert!(!store.exists("a/b/1.bin"));
        let url = format!("file://{}", dir.display());
        assert_eq!(Store::open(&url).unwrap().root(), store.root());
    }

    #[test]
    fn keys_outside_the_store_and_unknown_schemes_are_refused() {
        let store = Store::open(temp("keys").to_str().unwrap()).unwrap();
        for key in ["", "/etc/passwd", "../x", "a/../../x"] {
            let err = store.put(key, b"x").unwrap_err();
            assert!(matches!(err, StoreError::Key(_)), "{key}: {err}");
        }
        let err = Store::open("s3://bucket/runs").unwrap_err().to_string();
        assert!(err.contains("s3") && err.contains("not supported"), "{err}");
        let err = store.get("missing").unwrap_err().to_string();
        assert!(err.contains("missing"), "{err}");
    }

    fn write_fence(store: &Store, generation: u64, writers: &[&str]) {
        let record = FenceRecord {
            generation,
            writers: writers.iter().map(|w| w.to_string()).collect(),
        };
        store
            .put(&layout::fence(), &serde_json::to_vec(&record).unwrap())
            .unwrap();
    }

    /// Every name under `dir`, recursively, relative to it.
    fn names(dir: &Path) -> Vec<String> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let rel = path.strip_prefix(dir).unwrap().display().to_string();
            if path.is_dir() {
                out.extend(names(&path).into_iter().map(|n| format!("{rel}/{n}")));
            }
            out.push(rel);
        }
        out.sort();
        out
    }

    #[test]
    fn a_fenced_writer_publishes_only_while_the_fence_lists_it() {
        let job = Store::open(temp("fence").to_str().unwrap()).unwrap();
        let worker = job.clone().fenced("worker-a");
        // No fence yet: nothing is published.
        let err = worker.put("cache/x.bin", b"early").unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
        write_fence(&job, 1, &["worker-a", "worker-b"]);
        worker.put("cache/x.bin", b"one").unwrap();
        worker
            .publish_dir("checkpoints/c1", |dir| std::fs::write(dir.join("w"), b"w1"))
            .unwrap();
        // Dropped by the coordinator: its late writes are refused and leave nothing behind.
        write_fence(&job, 2, &["worker-b"]);
        let err = worker.put("cache/x.bin", b"late").unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, StoreError::Fenced { .. })
                && text.contains("worker-a")
                && text.contains("cache/x.bin")
                && text.contains("generation 2"),
            "{text}"
        );
        let err = worker
            .publish_dir("checkpoints/c1", |dir| {
                std::fs::write(dir.join("w"), b"late")
            })
            .unwrap_err();
        assert!(matches!(err, StoreError::Fenced { .. }), "{err}");
        assert_eq!(job.get("cache/x.bin").unwrap(), b"one");
        assert_eq!(job.get("checkpoints/c1/w").unwrap(), b"w1");
        let left = names(job.root());
        assert!(left.iter().all(|n| !n.contains(".tmp-")), "{left:?}");
        // The writer that is still listed goes on.
        job.clone()
            .fenced("worker-b")
            .put("cache/x.bin", b"b")
            .unwrap();
        assert_eq!(job.get("cache/x.bin").unwrap(), b"b");
    }

    #[test]
    fn a_full_disk_is_retried_with_warnings_naming_the_path_then_fails_cleanly() {
        let dir = temp("full");
        let warnings = Arc::new(std::sync::Mutex::new(Vec::<StoreWarning>::new()));
        let seen = warnings.clone();
        let store = Store::open(dir.to_str().unwrap())
            .unwrap()
            .with_retry(Retry {
                attempts: 4,
                first_backoff: Duration::from_millis(1),
                max_backoff: Duration::from_millis(2),
            })
            .on_warning(Arc::new(move |w: &StoreWarning| {
                seen.lock().unwrap().push(w.clone())
            }));
        let full = || std::io::Error::from(std::io::ErrorKind::StorageFull);
        // Space comes back on the third attempt: the folder is published.
        let mut calls = 0;
        store
            .publish_dir("iteration-1", |d| {
                calls += 1;
                std::fs::write(d.join("part"), b"p")?;
                if calls < 3 {
                    return Err(full());
                }
                Ok(())
            })
            .unwrap();
        assert_eq!(calls, 3);
        assert_eq!(store.get("iteration-1/part").unwrap(), b"p");
        {
            let seen = warnings.lock().unwrap();
            assert_eq!(seen.len(), 2);
            let text = seen[0].to_string();
            assert!(
                text.contains("iteration-1") && text.contains("attempt 1 of 4"),
                "{text}"
            );
        }
        // Never: the last error names the path and no temporary is left.
        let err = store
            .publish_dir("iteration-2", |d| {
                std::fs::write(d.join("part"), b"p")?;
                Err(full())
            })
            .unwrap_err();
        assert!(
            err.is_transient() && err.to_string().contains("iteration-2"),
            "{err}"
        );
        assert_eq!(warnings.lock().unwrap().len(), 2 + 3);
        assert!(!store.exists("iteration-2"));
        let left = names(store.root());
        assert!(left.iter().all(|n| !n.contains(".tmp-")), "{left:?}");
        // A permanent error is not retried.
        let err = store
            .publish_dir("iteration-3", |_| {
                Err(std::io::Error::from(std::io::ErrorKind::PermissionDenied))
            })
            .unwrap_err();
        assert!(!err.is_transient(), "{err}");
        assert_eq!(warnings.lock().unwrap().len(), 5);
    }
}
