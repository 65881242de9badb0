//! diffusers `AutoencoderKL` (the Stable Diffusion VAE): the posterior's mean / log-variance,
//! decoding, loading (with the legacy attention names) and saving. Its config from
//! `vae/config.json` is in [`config`], the `Encoder` in [`encoder`], the `Decoder` in
//! [`decoder`].

use std::borrow::Cow;
use std::path::Path;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};

use super::{write_config, CONFIG_NAME, WEIGHTS_NAME};
use crate::error::ModelError;
use crate::nn::Conv2d;
use crate::weights::{load_module, save_module, WeightFile};

mod config;
mod decoder;
mod encoder;

pub use config::AutoencoderKLConfig;
pub use decoder::Decoder;
pub use encoder::Encoder;

/// diffusers `AutoencoderKL`; parameter paths are the diffusers state-dict keys.
#[derive(Module, Debug)]
pub struct AutoencoderKL {
    /// Image to posterior moments.
    pub encoder: Encoder,
    /// Latents to image.
    pub decoder: Decoder,
    /// 1x1 conv on the moments.
    pub quant_conv: Option<Conv2d>,
    /// 1x1 conv on the latents before decoding.
    pub post_quant_conv: Option<Conv2d>,
    #[module(skip)]
    scaling_factor: f64,
}

/// The pseudo-path named in errors about configs that did not come from a file.
const IN_MEMORY: &str = "<AutoencoderKLConfig>";

impl AutoencoderKL {
    /// Builds the model from `config` (validated; parameters lazily initialised).
    pub fn new(config: &AutoencoderKLConfig, device: &Device) -> Result<Self, ModelError> {
        config.validate(Path::new(IN_MEMORY))?;
        Ok(Self::build(config, device))
    }

    fn build(config: &AutoencoderKLConfig, device: &Device) -> Self {
        let latent = config.latent_channels;
        Self {
            encoder: Encoder::new(config, device),
            decoder: Decoder::new(config, device),
            quant_conv: config
                .use_quant_conv
                .then(|| Conv2d::new(2 * latent, 2 * latent, 1, 1, 0, device)),
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| Conv2d::new(latent, latent, 1, 1, 0, device)),
            scaling_factor: config.scaling_factor,
        }
    }

    /// Loads a diffusers `vae/` folder: `config.json` and
    /// `diffusion_pytorch_model.safetensors`. Checkpoints with the legacy mid-block attention
    /// names (`query`, `key`, `value`, `proj_attn`) are renamed as diffusers does.
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, AutoencoderKLConfig), ModelError> {
        let config = AutoencoderKLConfig::from_file(&dir.join(CONFIG_NAME))?;
        let model = Self::build(&config, device);
        let file = WeightFile::open(&dir.join(WEIGHTS_NAME))?;
        let file = rename_legacy_attention(file)?;
        let model = load_module(model, &file, "", device)?;
        Ok((model, config))
    }

    /// Writes `config.json` (with `_class_name`) and `diffusion_pytorch_model.safetensors`
    /// (f32) into `dir`, creating it if needed.
    pub fn save(&self, config: &AutoencoderKLConfig, dir: &Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        write_config(config, "AutoencoderKL", &dir.join(CONFIG_NAME))?;
        save_module(self, &dir.join(WEIGHTS_NAME))
    }

    /// The config's `scaling_factor` (latents are multiplied by it before the UNet).
    pub fn scaling_factor(&self) -> f64 {
        self.scaling_factor
    }

    /// Posterior of `image: [N, 3, H, W]` (values in `[-1, 1]`): `(mean, logvar)`, each
    /// `[N, latent, H / 8, W / 8]` for SD, `logvar` clamped to `[-30, 20]` as diffusers does.
    pub fn encode(&self, image: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let moments = self.encoder.forward(image);
        let moments = match &self.quant_conv {
            Some(conv) => conv.forward(moments),
            None => moments,
        };
        let latent = moments.dims()[1] / 2;
        let mean = moments.clone().narrow(1, 0, latent);
        let logvar = moments.narrow(1, latent, latent).clamp(-30.0, 20.0);
        (mean, logvar)
    }

    /// A posterior sample `mean + exp(logvar / 2) * noise` (`noise` standard normal, same shape).
    pub fn sample_posterior(mean: Tensor<4>, logvar: Tensor<4>, noise: Tensor<4>) -> Tensor<4> {
        mean + (logvar * 0.5).exp() * noise
    }

    /// `latents: [N, latent, h, w]` (unscaled: divide UNet latents by `scaling_factor` first)
    /// `-> image [N, 3, 8h, 8w]` for SD, roughly in `[-1, 1]`.
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(latents),
            None => latents,
        };
        self.decoder.forward(z)
    }
}

/// Legacy diffusers names of the VAE mid-block attention projections and their current names.
const LEGACY_ATTENTION_NAMES: &[(&str, &str)] = &[
    (".query.", ".to_q."),
    (".key.", ".to_k."),
    (".value.", ".to_v."),
    (".proj_attn.", ".to_out.0."),
];

/// The file itself, or (for checkpoints saved before diffusers renamed the VAE attention
/// projections) a copy with the current names, 1x1-conv shaped weights flattened to Linear.
fn rename_legacy_attention(file: WeightFile) -> Result<WeightFile, ModelError> {
    let legacy = |key: &str| {
        key.contains(".mid_block.attentions.")
            && LEGACY_ATTENTION_NAMES
                .iter()
                .any(|(old, _)| key.contains(old))
    };
    if !file.keys().any(legacy) {
        return Ok(file);
    }
    let path = file.path().to_path_buf();
    let invalid = |message: String| ModelError::WeightFile {
        path: path.clone(),
        message,
    };
    let mut entries = Vec::new();
    for key in file.keys() {
        let stored = file.require(key)?;
        let mut name: Cow<str> = Cow::Borrowed(key);
        let mut shape = stored.shape.clone();
        if legacy(key) {
            for (old, new) in LEGACY_ATTENTION_NAMES {
                name = Cow::Owned(name.replace(old, new));
            }
            if shape.len() == 4 && shape[2] == 1 && shape[3] == 1 {
                shape.truncate(2);
            }
        }
        let bytes: Vec<u8> = stored.values.iter().flat_map(|v| v.to_le_bytes()).collect();
        entries.push((name.into_owned(), shape, bytes));
    }
    let views = entries
        .iter()
        .map(|(name, shape, bytes)| {
            TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map(|view| (name.clone(), view))
                .map_err(|e| invalid(format!("tensor `{name}`: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = safetensors::serialize(views, None).map_err(|e| invalid(e.to_string()))?;
    WeightFile::from_bytes(&path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::named_shapes;

    fn tiny() -> AutoencoderKLConfig {
        AutoencoderKLConfig {
            down_block_types: vec!["DownEncoderBlock2D".to_string(); 2],
            up_block_types: vec!["UpDecoderBlock2D".to_string(); 2],
            block_out_channels: vec![8, 16],
            norm_num_groups: 4,
            ..AutoencoderKLConfig::diffusers_default()
        }
    }

    #[test]
    fn shapes_and_keys() {
        let device = Device::flex();
        let vae = AutoencoderKL::new(&tiny(), &device).expect("vae");
        let keys: Vec<String> = named_shapes(&vae).into_iter().map(|(k, _)| k).collect();
        for key in [
            "encoder.down_blocks.0.downsamplers.0.conv.weight",
            "encoder.mid_block.attentions.0.group_norm.weight",
            "encoder.mid_block.attentions.0.to_out.0.bias",
            "decoder.up_blocks.0.upsamplers.0.conv.weight",
            "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
            "quant_conv.weight",
            "post_quant_conv.bias",
        ] {
            assert!(keys.iter().any(|k| k == key), "missing {key}");
        }
        let (mean, logvar) = vae.encode(Tensor::<4>::ones([1, 3, 16, 16], &device));
        assert_eq!(mean.dims(), [1, 4, 8, 8]);
        assert_eq!(logvar.dims(), [1, 4, 8, 8]);
        assert_eq!(vae.decode(mean).dims(), [1, 3, 16, 16]);
    }

    #[test]
    fn gradients_flow_under_autodiff() {
        let device = Device::flex().autodiff();
        let vae = AutoencoderKL::new(&tiny(), &device).expect("vae");
        let (mean, logvar) = vae.encode(Tensor::<4>::ones([1, 3, 8, 8], &device));
        let loss = vae.decode(mean).powi_scalar(2).mean() + logvar.mean();
        let grads = loss.backward();
        let attention = &vae.encoder.mid_block.attentions[0].to_q.weight;
        for grad in [
            vae.encoder
                .conv_in
                .weight
                .val()
                .grad(&grads)
                .map(|g| g.abs().sum()),
            attention.val().grad(&grads).map(|g| g.abs().sum()),
        ] {
            let total = grad.expect("gradient").into_scalar::<f32>();
            assert!(total.is_finite() && total > 0.0, "gradient sum {total}");
        }
    }

    #[test]
    fn sd15_default_is_valid() {
        let config = AutoencoderKLConfig::default();
        let vae = AutoencoderKL::new(&config, &Device::flex()).expect("vae");
        let count: usize = named_shapes(&vae)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        assert_eq!(count, 83_653_863);
    }
}
