//! Checksum manifests of snapshots and checkpoints: files are written, then read back and
//! hashed (sha256), then `manifest.json` is published by an atomic rename. A folder without a
//! manifest, or whose files do not match it, is never loaded.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// File name of the manifest inside a published folder.
pub const MANIFEST: &str = "manifest.json";

/// What a published folder holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// What was published (e.g. `snapshot 2 of job toy-spin`).
    pub description: String,
    /// Relative path -> (bytes, sha256 hex).
    pub files: BTreeMap<String, (u64, String)>,
}

/// Why a folder cannot be trusted.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// Reading or writing failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// No manifest: the folder was never published (or its writer died).
    #[error("{0} has no manifest.json: it was never published")]
    Unpublished(PathBuf),
    /// A file does not match its checksum or is missing.
    #[error("{path} does not match the manifest: {reason}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// What differs.
        reason: String,
    },
    /// The manifest itself is not valid JSON.
    #[error("{path}: invalid manifest: {message}")]
    Invalid {
        /// The manifest.
        path: PathBuf,
        /// Parser message.
        message: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ManifestError + '_ {
    move |source| ManifestError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// sha256 and size of a file, streamed.
pub fn hash_file(path: &Path) -> Result<(u64, String), ManifestError> {
    let mut file = std::fs::File::open(path).map_err(io(path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buffer).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        total += n as u64;
    }
    Ok((total, hex::encode(hasher.finalize())))
}

fn list_files(root: &Path, dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ManifestError> {
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let path = entry.path();
        if path.is_dir() {
            list_files(root, &path, out)?;
        } else if path.file_name().is_some_and(|n| n != MANIFEST) {
            out.push(path.strip_prefix(root).unwrap_or(&path).to_path_buf());
        }
    }
    Ok(())
}

/// Hashes every file under `dir` (read back from disk) and publishes `manifest.json`
/// atomically. Call after every file is written and synced.
pub fn publish(dir: &Path, description: &str) -> Result<Manifest, ManifestError> {
    let mut files = Vec::new();
    list_files(dir, dir, &mut files)?;
    let mut manifest = Manifest {
        description: description.to_string(),
        files: BTreeMap::new(),
    };
    for rel in files {
        let entry = hash_file(&dir.join(&rel))?;
        manifest
            .files
            .insert(rel.to_string_lossy().replace('\\', "/"), entry);
    }
    let path = dir.join(MANIFEST);
    let tmp = dir.join(".manifest.json.tmp");
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| ManifestError::Invalid {
        path: path.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    Ok(manifest)
}

/// Checks that `dir` was published and every file matches its checksum.
pub fn verify(dir: &Path) -> Result<Manifest, ManifestError> {
    let path = dir.join(MANIFEST);
    if !path.exists() {
        return Err(ManifestError::Unpublished(dir.to_path_buf()));
    }
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| ManifestError::Invalid {
        path: path.clone(),
        message: e.to_string(),
    })?;
    for (rel, (size, sha)) in &manifest.files {
        let file = dir.join(rel);
        if !file.exists() {
            return Err(ManifestError::Mismatch {
                path: file,
                reason: "missing".into(),
            });
        }
        let (actual_size, actual_sha) = hash_file(&file)?;
        if actual_size != *size || &actual_sha != sha {
            return Err(ManifestError::Mismatch {
                path: file,
                reason: format!(
                    "{actual_size} bytes sha256 {actual_sha}, manifest says {size} bytes {sha}"
                ),
            });
        }
    }
    Ok(manifest)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn publish_then_verify_and_detect_corruption() {
        let dir = std::env::temp_dir().join(format!("spin-manifest-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("unet")).unwrap();
        assert!(matches!(verify(&dir), Err(ManifestError::Unpublished(_))));
        std::fs::write(dir.join("unet/w.bin"), b"weights").unwrap();
        std::fs::write(dir.join("a.json"), b"{}").unwrap();
        let manifest = publish(&dir, "test").unwrap();
        assert_eq!(manifest.files.len(), 2);
        verify(&dir).unwrap();
        std::fs::write(dir.join("unet/w.bin"), b"weightz").unwrap();
        let err = verify(&dir).unwrap_err().to_string();
        assert!(err.contains("w.bin"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
