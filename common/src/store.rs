//! The object store of a job's artifacts: cached latents, opponent samples, checkpoints,
//! snapshots, sample grids and metrics. A local directory (or `file://` URL) is the store
//! this build ships; every worker and the coordinator must see the same directory (one
//! machine, or a shared filesystem). Writes are atomic: a temporary file is written, synced and
//! renamed, so a reader never sees half an object.
//!
//! Keys are `/`-separated relative paths; [`layout`] names every key of a job.

use std::io::Write;
use std::path::{Component, Path, PathBuf};

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
}

/// A store rooted at a local directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Store {
    root: PathBuf,
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
        Ok(Self { root })
    }

    /// The store's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The store under `prefix` (a job's objects).
    pub fn sub(&self, prefix: &str) -> Result<Self, StoreError> {
        let root = self.path(prefix)?;
        std::fs::create_dir_all(&root).map_err(|e| self.io(prefix, e))?;
        Ok(Self { root })
    }

    fn io(&self, key: &str, source: std::io::Error) -> StoreError {
        StoreError::Io {
            key: key.to_string(),
            root: self.root.clone(),
            source,
        }
    }

    /// The local path of `key` (for writers of whole folders, such as snapshots).
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

    /// Writes `bytes` at `key` atomically (temporary file, fsync, rename).
    pub fn put(&self, key: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let path = self.path(key)?;
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| self.io(key, e))?;
        }
        let tmp = path.with_extension(format!(
            "tmp-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            std::fs::rename(&tmp, &path)
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            self.io(key, e)
        })
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

    /// Names directly under `prefix` (files and folders), sorted; empty if absent.
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
}
