//! Weight files: safetensors in and out, keyed by the module tree's parameter paths, which are
//! the diffusers / transformers key names.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Device, Tensor, TensorData};
use safetensors::tensor::{Dtype, TensorView};

use crate::error::ModelError;

/// Path segments that Rust field names cannot spell, mapped to their diffusers spelling.
const SEGMENT_ALIASES: &[(&str, &str)] = &[
    ("to_out_0", "to_out.0"),
    ("net_0", "net.0"),
    ("net_2", "net.2"),
];

/// One tensor read from a weight file, converted to f32.
#[derive(Clone, Debug)]
pub struct StoredTensor {
    /// Shape as stored.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

/// A safetensors file read into memory (f32, f16, bf16 and f64 are converted to f32; integer
/// tensors are kept as f32 as well, which is exact for ids and step counters below 2^24).
#[derive(Debug)]
pub struct WeightFile {
    path: PathBuf,
    tensors: HashMap<String, StoredTensor>,
}

impl WeightFile {
    /// Reads every tensor of `path`.
    pub fn open(path: &Path) -> Result<Self, ModelError> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_bytes(path, &bytes)
    }

    /// Parses safetensors `bytes`; `path` is only used in errors.
    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Self, ModelError> {
        let invalid = |message: String| ModelError::WeightFile {
            path: path.to_path_buf(),
            message,
        };
        let file =
            safetensors::SafeTensors::deserialize(bytes).map_err(|e| invalid(e.to_string()))?;
        let mut tensors = HashMap::new();
        for (name, view) in file.tensors() {
            let values = to_f32(view.dtype(), view.data()).ok_or_else(|| {
                invalid(format!(
                    "tensor `{name}` has unsupported dtype {:?}",
                    view.dtype()
                ))
            })?;
            let shape = view.shape().to_vec();
            tensors.insert(name, StoredTensor { shape, values });
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// The file this was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor stored under `key`.
    pub fn get(&self, key: &str) -> Option<&StoredTensor> {
        self.tensors.get(key)
    }

    /// The tensor stored under `key`, or an error naming it and the file.
    pub fn require(&self, key: &str) -> Result<&StoredTensor, ModelError> {
        self.get(key).ok_or_else(|| ModelError::MissingTensor {
            key: key.to_string(),
            path: self.path.clone(),
        })
    }

    /// The tensor under `key` on `device`, checked to have `D` dimensions.
    pub fn tensor<const D: usize>(
        &self,
        key: &str,
        device: &Device,
    ) -> Result<Tensor<D>, ModelError> {
        let stored = self.require(key)?;
        if stored.shape.len() != D {
            return Err(ModelError::ShapeMismatch {
                key: key.to_string(),
                path: self.path.clone(),
                expected: vec![0; D],
                found: stored.shape.clone(),
            });
        }
        Ok(Tensor::from_data(
            TensorData::new(stored.values.clone(), stored.shape.clone()),
            device,
        ))
    }

    /// Every key in the file.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}

fn to_f32(dtype: Dtype, data: &[u8]) -> Option<Vec<f32>> {
    let values = match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32)
            .collect(),
        Dtype::I32 => data
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
            .collect(),
        _ => return None,
    };
    Some(values)
}

/// Tracks the parameter path while a visitor or mapper walks a module tree.
#[derive(Default)]
pub(crate) struct KeyPath {
    segments: Vec<Option<String>>,
}

impl KeyPath {
    pub(crate) fn enter(&mut self, name: &str, container_type: &str) {
        // Enum variants are a Rust detail: diffusers keys go straight through them.
        let segment = (!container_type.starts_with("Enum:")).then(|| {
            SEGMENT_ALIASES
                .iter()
                .find(|(ours, _)| *ours == name)
                .map_or_else(|| name.to_string(), |(_, theirs)| theirs.to_string())
        });
        self.segments.push(segment);
    }

    pub(crate) fn exit(&mut self) {
        self.segments.pop();
    }

    pub(crate) fn key(&self, prefix: &str) -> String {
        let mut key = prefix.to_string();
        for segment in self.segments.iter().flatten() {
            if !key.is_empty() {
                key.push('.');
            }
            key.push_str(segment);
        }
        key
    }
}

struct Loader<'a> {
    path: KeyPath,
    prefix: &'a str,
    file: &'a WeightFile,
    device: &'a Device,
    used: HashSet<String>,
    error: Option<ModelError>,
}

impl ModuleMapper for Loader<'_> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        if self.error.is_some() {
            return param;
        }
        let key = self.path.key(self.prefix);
        let expected = param.lazy_shape().to_vec();
        let stored = match self.file.require(&key) {
            Ok(stored) => stored,
            Err(err) => {
                self.error = Some(err);
                return param;
            }
        };
        if stored.shape != expected {
            self.error = Some(ModelError::ShapeMismatch {
                key,
                path: self.file.path.clone(),
                expected,
                found: stored.shape.clone(),
            });
            return param;
        }
        let mut tensor = Tensor::from_data(
            TensorData::new(stored.values.clone(), stored.shape.clone()),
            self.device,
        );
        if self.device.is_autodiff() {
            tensor = tensor.require_grad();
        }
        self.used.insert(key);
        Param::initialized(param.id, tensor)
    }
}

/// Fills every parameter of `module` from `file`, where parameter `a.b.weight` is stored under
/// `{prefix}.a.b.weight`. A missing or misshapen tensor is an error naming key and file; tensors
/// the module does not use are logged and ignored (buffers such as `position_ids`).
pub fn load_module<M: Module>(
    module: M,
    file: &WeightFile,
    prefix: &str,
    device: &Device,
) -> Result<M, ModelError> {
    let mut loader = Loader {
        path: KeyPath::default(),
        prefix,
        file,
        device,
        used: HashSet::new(),
        error: None,
    };
    let module = module.map(&mut loader);
    if let Some(err) = loader.error {
        return Err(err);
    }
    let unused: Vec<&str> = file
        .keys()
        .filter(|k| k.starts_with(prefix) && !loader.used.contains(*k))
        .collect();
    if !unused.is_empty() {
        tracing::debug!(file = %file.path.display(), count = unused.len(), first = unused[0], "tensors not used by the model");
    }
    Ok(module)
}

struct Collector<F: FnMut(String, Tensor<1>, Vec<usize>)> {
    path: KeyPath,
    each: F,
}

impl<F: FnMut(String, Tensor<1>, Vec<usize>)> ModuleVisitor for Collector<F> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let tensor = param.val();
        let shape = tensor.dims().to_vec();
        let numel: usize = shape.iter().product();
        (self.each)(self.path.key(""), tensor.reshape([numel]), shape);
    }
}

/// Calls `each(key, flattened value, shape)` for every parameter, in module order.
pub fn visit_named_params<M: Module>(module: &M, each: impl FnMut(String, Tensor<1>, Vec<usize>)) {
    let mut collector = Collector {
        path: KeyPath::default(),
        each,
    };
    module.visit(&mut collector);
}

struct ShapeLister {
    path: KeyPath,
    out: Vec<(String, Vec<usize>)>,
}

impl ModuleVisitor for ShapeLister {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.path.enter(name, container_type);
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.exit();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        self.out
            .push((self.path.key(""), param.lazy_shape().to_vec()));
    }
}

/// Every parameter key with its shape, in module order, without materialising any value.
pub fn named_shapes<M: Module>(module: &M) -> Vec<(String, Vec<usize>)> {
    let mut lister = ShapeLister {
        path: KeyPath::default(),
        out: Vec::new(),
    };
    module.visit(&mut lister);
    lister.out
}

/// Writes named f32 tensors to a safetensors file at `path` (written to a temporary file first,
/// then renamed, so a crash never leaves a torn file under the final name).
pub fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, (Vec<usize>, Vec<f32>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<(), ModelError> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(key, (shape, values))| {
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (key.clone(), shape.clone(), bytes)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(key, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|view| (key.clone(), view))
                .map_err(|e| ModelError::WeightFile {
                    path: path.to_path_buf(),
                    message: format!("tensor `{key}`: {e}"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let tmp = path.with_extension("safetensors.tmp");
    let written = safetensors::serialize_to_file(views, metadata, &tmp)
        .map_err(|e| match e {
            // Kept as an I/O error, so a full disk is seen as one (and retried by the store).
            safetensors::SafeTensorError::IoError(e) => ModelError::io(&tmp, e),
            e => ModelError::WeightFile {
                path: tmp.clone(),
                message: e.to_string(),
            },
        })
        .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| ModelError::io(path, e)));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Saves every parameter of `module` to a safetensors file, keyed by parameter path.
pub fn save_module<M: Module>(module: &M, path: &Path) -> Result<(), ModelError> {
    let mut tensors = BTreeMap::new();
    visit_named_params(module, |key, value, shape| {
        let values = value
            .into_data()
            .convert::<f32>()
            .try_to_vec::<f32>()
            .unwrap_or_default();
        tensors.insert(key, (shape, values));
    });
    write_safetensors(
        path,
        &tensors,
        Some(HashMap::from([("format".to_string(), "pt".to_string())])),
    )
}
