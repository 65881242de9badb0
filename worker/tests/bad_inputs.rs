//! Bad inputs to model loading: weight files that are not safetensors, truncated, misshapen or
//! incomplete; pipeline folders with files missing, unreadable configs, unsupported options or
//! components that do not fit together; initial latents of the wrong shape. Each error must
//! name the thing (key, option, file). The table in `docs/bad-inputs.md` points at these tests.

#![allow(clippy::unwrap_used)] // tests may panic on failure

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use burn::tensor::{Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use spin_worker::error::ModelError;
use spin_worker::models::{UNet2DConditionModel, WEIGHTS_NAME};
use spin_worker::pipeline::{SampleOptions, StableDiffusion};
use spin_worker::text::{ClipTextConfig, ClipTextModel};
use spin_worker::toy_model::{toy_text_config, toy_unet_config, write_toy_pipeline};
use spin_worker::weights::{save_module, write_safetensors, WeightFile};

/// A fresh folder under the system temp dir, unique per process and call, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "spin-worker-bad-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The files of the toy pipeline (relative path, bytes), written once per test binary and
/// kept in memory, so nothing is left on disk after the tests.
fn toy_files() -> &'static [(PathBuf, Vec<u8>)] {
    static FILES: OnceLock<Vec<(PathBuf, Vec<u8>)>> = OnceLock::new();
    FILES.get_or_init(|| {
        let dir = Scratch::new("toy");
        write_toy_pipeline(&dir, &Device::flex()).unwrap();
        let mut files = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(folder) = pending.pop() {
            for entry in std::fs::read_dir(&folder).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    pending.push(path);
                } else {
                    let relative = path.strip_prefix(&*dir).unwrap().to_path_buf();
                    files.push((relative, std::fs::read(&path).unwrap()));
                }
            }
        }
        files
    })
}

/// A fresh copy of the toy pipeline to break, at `scratch/pipeline`.
fn pipeline_copy(scratch: &Scratch) -> PathBuf {
    let dir = scratch.join("pipeline");
    for (relative, bytes) in toy_files() {
        let path = dir.join(relative);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    dir
}

/// Every tensor of the toy UNet, by key.
fn unet_tensors() -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let (_, bytes) = toy_files()
        .iter()
        .find(|(p, _)| p.ends_with(WEIGHTS_NAME))
        .unwrap();
    let file = WeightFile::from_bytes(Path::new(WEIGHTS_NAME), bytes).unwrap();
    file.keys()
        .map(|k| {
            let t = file.get(k).unwrap();
            (k.to_string(), (t.shape.clone(), t.values.clone()))
        })
        .collect()
}

fn load_unet(dir: &Path) -> ModelError {
    match UNet2DConditionModel::load(dir, &Device::flex()) {
        Ok(_) => panic!("the UNet in {} loaded", dir.display()),
        Err(err) => err,
    }
}

fn load_pipeline(dir: &Path) -> ModelError {
    match StableDiffusion::load(dir, &Device::flex()) {
        Ok(_) => panic!("the pipeline {} loaded", dir.display()),
        Err(err) => err,
    }
}

fn assert_names(err: &str, things: &[&str]) {
    eprintln!("{err}");
    for thing in things {
        assert!(err.contains(thing), "{thing:?} not named in: {err}");
    }
}

#[test]
fn a_weight_file_that_is_not_safetensors_names_the_file() {
    let scratch = Scratch::new("notsafetensors");
    let dir = pipeline_copy(&scratch).join("unet");
    std::fs::write(
        dir.join(WEIGHTS_NAME),
        b"PK\x03\x04 this is a zip, not safetensors",
    )
    .unwrap();
    let err = load_unet(&dir);
    assert!(matches!(err, ModelError::WeightFile { .. }), "{err:?}");
    assert_names(&err.to_string(), &["invalid weight file", WEIGHTS_NAME]);
}

#[test]
fn a_truncated_weight_file_names_the_file() {
    let scratch = Scratch::new("truncated");
    let dir = pipeline_copy(&scratch).join("unet");
    let path = dir.join(WEIGHTS_NAME);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 1000]).unwrap();
    let err = load_unet(&dir);
    assert!(matches!(err, ModelError::WeightFile { .. }), "{err:?}");
    assert_names(&err.to_string(), &[WEIGHTS_NAME]);
}

#[test]
fn a_tensor_of_the_wrong_shape_names_key_file_and_both_shapes() {
    let scratch = Scratch::new("shape");
    let dir = pipeline_copy(&scratch).join("unet");
    let mut tensors = unet_tensors();
    let (shape, values) = tensors.get_mut("conv_in.weight").unwrap();
    assert_eq!(shape, &vec![32, 3, 3, 3]);
    *shape = vec![32, 27];
    let _ = values;
    write_safetensors(&dir.join(WEIGHTS_NAME), &tensors, None).unwrap();
    let err = load_unet(&dir);
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{err:?}");
    assert_names(
        &err.to_string(),
        &[
            "`conv_in.weight`",
            WEIGHTS_NAME,
            "[32, 27]",
            "[32, 3, 3, 3]",
        ],
    );
}

#[test]
fn a_missing_tensor_is_named_with_the_file() {
    let scratch = Scratch::new("missing-tensor");
    let dir = pipeline_copy(&scratch).join("unet");
    let mut tensors = unet_tensors();
    tensors.remove("conv_out.bias").unwrap();
    write_safetensors(&dir.join(WEIGHTS_NAME), &tensors, None).unwrap();
    let err = load_unet(&dir);
    assert!(matches!(err, ModelError::MissingTensor { .. }), "{err:?}");
    assert_names(
        &err.to_string(),
        &["`conv_out.bias`", "is missing", WEIGHTS_NAME],
    );
}

#[test]
fn a_tensor_of_an_unsupported_dtype_is_named() {
    let scratch = Scratch::new("dtype");
    let path = scratch.join("bools.safetensors");
    let data = [1u8, 0, 1, 1];
    let view = TensorView::new(Dtype::BOOL, vec![4], &data).unwrap();
    safetensors::serialize_to_file([("mask", view)], None, &path).unwrap();
    let err = WeightFile::open(&path).unwrap_err();
    assert_names(&err.to_string(), &["`mask`", "BOOL", "bools.safetensors"]);
}

#[test]
fn an_unsupported_config_option_names_option_value_and_file() {
    let scratch = Scratch::new("unsupported");
    let dir = pipeline_copy(&scratch);
    let config = dir.join("unet/config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    json["upcast_attention"] = true.into();
    std::fs::write(&config, json.to_string()).unwrap();
    let err = load_pipeline(&dir);
    assert!(matches!(err, ModelError::Unsupported { .. }), "{err:?}");
    assert_names(
        &err.to_string(),
        &["`upcast_attention`", "true", "unet/config.json"],
    );
}

#[test]
fn a_pipeline_without_model_index_is_named() {
    let scratch = Scratch::new("noindex");
    let dir = pipeline_copy(&scratch);
    std::fs::remove_file(dir.join("model_index.json")).unwrap();
    let err = load_pipeline(&dir);
    assert!(matches!(err, ModelError::MissingFile { .. }), "{err:?}");
    assert_names(&err.to_string(), &["missing file", "model_index.json"]);
}

#[test]
fn a_pipeline_without_unet_config_is_named() {
    let scratch = Scratch::new("nounetconfig");
    let dir = pipeline_copy(&scratch);
    std::fs::remove_file(dir.join("unet/config.json")).unwrap();
    let err = load_pipeline(&dir);
    assert!(matches!(err, ModelError::MissingFile { .. }), "{err:?}");
    assert_names(&err.to_string(), &["missing file", "unet/config.json"]);
}

#[test]
fn an_unparsable_config_names_the_file_and_line() {
    let scratch = Scratch::new("badjson");
    let dir = pipeline_copy(&scratch);
    std::fs::write(
        dir.join("text_encoder/config.json"),
        "{\n  \"hidden_size\": 32,\n",
    )
    .unwrap();
    let err = load_pipeline(&dir);
    assert!(matches!(err, ModelError::Config { .. }), "{err:?}");
    assert_names(&err.to_string(), &["text_encoder/config.json", "line 3"]);
}

#[test]
fn a_tokenizer_longer_than_the_text_encoder_is_refused_at_load() {
    let scratch = Scratch::new("toolong");
    let dir = pipeline_copy(&scratch);
    let path = dir.join("tokenizer/tokenizer_config.json");
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    json["model_max_length"] = 100.into();
    std::fs::write(&path, json.to_string()).unwrap();
    let err = load_pipeline(&dir).to_string();
    assert_names(
        &err,
        &["model_max_length", "100", "max_position_embeddings", "77"],
    );
}

#[test]
fn a_text_encoder_of_the_wrong_width_for_the_unet_is_refused_at_load() {
    let scratch = Scratch::new("width");
    let dir = pipeline_copy(&scratch);
    let config = ClipTextConfig {
        hidden_size: 48,
        ..toy_text_config()
    };
    let text = ClipTextModel::new(&config, &Device::flex());
    save_module(&text, &dir.join("text_encoder/model.safetensors")).unwrap();
    std::fs::write(
        dir.join("text_encoder/config.json"),
        serde_json::to_string(&config).unwrap(),
    )
    .unwrap();
    let err = load_pipeline(&dir).to_string();
    assert_names(
        &err,
        &[
            "cross_attention_dim",
            "32",
            "hidden_size",
            "48",
            "unet/config.json",
        ],
    );
}

#[test]
fn a_pixel_space_unet_that_is_not_rgb_is_refused_at_load() {
    let scratch = Scratch::new("channels");
    let dir = pipeline_copy(&scratch);
    let mut config = toy_unet_config();
    config.in_channels = 4;
    config.out_channels = 4;
    UNet2DConditionModel::new(&config, &Device::flex())
        .unwrap()
        .save(&config, &dir.join("unet"))
        .unwrap();
    let err = load_pipeline(&dir).to_string();
    assert_names(
        &err,
        &[
            "in_channels is 4",
            "no vae",
            "RGB",
            "needs 3",
            "unet/config.json",
        ],
    );
}

#[test]
fn latents_of_the_wrong_shape_are_an_input_error() {
    let device = Device::flex();
    let scratch = Scratch::new("latents");
    let pipeline = StableDiffusion::load(&pipeline_copy(&scratch), &device).unwrap();
    let options = SampleOptions {
        steps: 1,
        ..SampleOptions::default()
    };
    for shape in [[1, 4, 32, 32], [1, 3, 0, 0], [0, 3, 32, 32]] {
        let latents = Tensor::<4>::zeros(shape, &device);
        let err = match pipeline.sample_latents("a red circle", None, latents, &options, |_, _| {})
        {
            Ok(_) => panic!("latents of shape {shape:?} were sampled"),
            Err(err) => err,
        };
        assert!(matches!(err, ModelError::InputShape { .. }), "{err:?}");
        assert_names(
            &err.to_string(),
            &["latents", &format!("{shape:?}"), "[N, 3, H, W]"],
        );
    }
}
