//! diffusers `AutoencoderKL` (the Stable Diffusion VAE): config from `vae/config.json`,
//! `Encoder`, `Decoder`, the posterior's mean / log-variance, decoding, loading and saving.

use std::borrow::Cow;
use std::path::Path;

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};

use super::unet_2d_blocks::{BlockConfig, DownEncoderBlock2D, UNetMidBlock2D, UpDecoderBlock2D};
use super::unet_2d_condition::OneOrMany;
use super::{config_error, read_config, require_silu, write_config, CONFIG_NAME, WEIGHTS_NAME};
use crate::error::ModelError;
use crate::nn::{Conv2d, GroupNorm};
use crate::weights::{load_module, save_module, WeightFile};

/// `vae/config.json` of a diffusers `AutoencoderKL`. Missing fields take diffusers' defaults;
/// unknown fields are ignored. `Default` is SD-1.5's VAE.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default = "AutoencoderKLConfig::diffusers_default")]
pub struct AutoencoderKLConfig {
    /// Image channels in.
    pub in_channels: usize,
    /// Image channels out.
    pub out_channels: usize,
    /// `DownEncoderBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// `UpDecoderBlock2D` per level.
    pub up_block_types: Vec<String>,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder block (decoder blocks have one more).
    pub layers_per_block: usize,
    /// Must be `silu`.
    pub act_fn: String,
    /// Latent channels.
    pub latent_channels: usize,
    /// Group-norm groups.
    pub norm_num_groups: usize,
    /// Image size the model was trained on (informational).
    pub sample_size: OneOrMany<usize>,
    /// Latents are multiplied by this before entering the UNet.
    pub scaling_factor: f64,
    /// Latents are shifted by this before scaling (SD3/Flux VAEs; `None` for SD 1.x/2.x).
    pub shift_factor: Option<f64>,
    /// Per-channel latent means (informational).
    pub latents_mean: Option<Vec<f64>>,
    /// Per-channel latent standard deviations (informational).
    pub latents_std: Option<Vec<f64>>,
    /// diffusers runs the VAE in f32 when true (informational).
    pub force_upcast: bool,
    /// A 1x1 conv after the encoder.
    pub use_quant_conv: bool,
    /// A 1x1 conv before the decoder.
    pub use_post_quant_conv: bool,
    /// An attention in the encoder's and decoder's mid blocks.
    pub mid_block_add_attention: bool,
}

impl Default for AutoencoderKLConfig {
    /// Stable Diffusion 1.5's `vae/config.json`.
    fn default() -> Self {
        Self {
            down_block_types: vec!["DownEncoderBlock2D".to_string(); 4],
            up_block_types: vec!["UpDecoderBlock2D".to_string(); 4],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            sample_size: OneOrMany::One(512),
            ..Self::diffusers_default()
        }
    }
}

impl AutoencoderKLConfig {
    /// diffusers' `AutoencoderKL.__init__` defaults (used for fields a file omits).
    pub fn diffusers_default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".to_string()],
            up_block_types: vec!["UpDecoderBlock2D".to_string()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".to_string(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: OneOrMany::One(32),
            scaling_factor: 0.18215,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }

    /// Reads and validates a diffusers `vae/config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let config: Self = read_config(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks every option is supported and consistent; errors name the option, its value and
    /// `source` (the config file).
    pub fn validate(&self, source: &Path) -> Result<(), ModelError> {
        require_silu(source, "act_fn", &self.act_fn)?;
        let n = self.block_out_channels.len();
        if n == 0 {
            return Err(config_error(source, "`block_out_channels` is empty"));
        }
        for (option, types, supported) in [
            (
                "down_block_types",
                &self.down_block_types,
                "DownEncoderBlock2D",
            ),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if types.len() != n {
                return Err(config_error(
                    source,
                    format!(
                        "`{option}` has {} entries but `block_out_channels` has {n}",
                        types.len()
                    ),
                ));
            }
            if let Some(other) = types.iter().find(|t| t.as_str() != supported) {
                return Err(ModelError::unsupported(source, option, other));
            }
        }
        let groups = self.norm_num_groups;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| groups == 0 || c % groups != 0)
        {
            return Err(config_error(
                source,
                format!("`norm_num_groups` = {groups} does not divide the {c} channels of a block"),
            ));
        }
        Ok(())
    }

    fn block(&self, in_channels: usize, out_channels: usize, num_layers: usize) -> BlockConfig {
        BlockConfig {
            in_channels,
            out_channels,
            temb_channels: None,
            num_layers,
            groups: self.norm_num_groups,
            eps: 1e-6,
            output_scale_factor: 1.0,
        }
    }
}

/// diffusers VAE `Encoder` (`double_z`): image `[N, 3, H, W]` to posterior moments
/// `[N, 2 * latent, H / 2^(levels-1), W / 2^(levels-1)]`.
#[derive(Module, Debug)]
pub struct Encoder {
    /// `in_channels -> block_out_channels[0]`.
    pub conv_in: Conv2d,
    /// Down blocks (padding-0 downsamplers except the last).
    pub down_blocks: Vec<DownEncoderBlock2D>,
    /// Resnet, attention, resnet.
    pub mid_block: UNetMidBlock2D,
    /// Output group norm.
    pub conv_norm_out: GroupNorm,
    /// `block_out_channels[-1] -> 2 * latent_channels`.
    pub conv_out: Conv2d,
}

impl Encoder {
    fn new(config: &AutoencoderKLConfig, device: &Device) -> Self {
        let channels = &config.block_out_channels;
        let n = channels.len();
        let last = channels[n - 1];
        Self {
            conv_in: Conv2d::new(config.in_channels, channels[0], 3, 1, 1, device),
            down_blocks: (0..n)
                .map(|i| {
                    let in_channels = if i == 0 { channels[0] } else { channels[i - 1] };
                    let block = config.block(in_channels, channels[i], config.layers_per_block);
                    DownEncoderBlock2D::new(block, (i + 1 < n).then_some(0), device)
                })
                .collect(),
            mid_block: UNetMidBlock2D::new(
                config.block(last, last, 1),
                last,
                config.mid_block_add_attention,
                device,
            ),
            conv_norm_out: GroupNorm::new(config.norm_num_groups, last, 1e-6, device),
            conv_out: Conv2d::new(last, 2 * config.latent_channels, 3, 1, 1, device),
        }
    }

    /// `[N, C, H, W] -> [N, 2 * latent, h, w]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.conv_in.forward(x);
        for block in &self.down_blocks {
            x = block.forward(x);
        }
        let x = self.mid_block.forward(x);
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}

/// diffusers VAE `Decoder` (group norm): latents `[N, latent, h, w]` to an image.
#[derive(Module, Debug)]
pub struct Decoder {
    /// `latent_channels -> block_out_channels[-1]`.
    pub conv_in: Conv2d,
    /// Resnet, attention, resnet.
    pub mid_block: UNetMidBlock2D,
    /// Up blocks (deepest first; upsamplers except the last).
    pub up_blocks: Vec<UpDecoderBlock2D>,
    /// Output group norm.
    pub conv_norm_out: GroupNorm,
    /// `block_out_channels[0] -> out_channels`.
    pub conv_out: Conv2d,
}

impl Decoder {
    fn new(config: &AutoencoderKLConfig, device: &Device) -> Self {
        let channels = &config.block_out_channels;
        let n = channels.len();
        let last = channels[n - 1];
        Self {
            conv_in: Conv2d::new(config.latent_channels, last, 3, 1, 1, device),
            mid_block: UNetMidBlock2D::new(
                config.block(last, last, 1),
                last,
                config.mid_block_add_attention,
                device,
            ),
            up_blocks: (0..n)
                .map(|i| {
                    let prev = channels[n - i.max(1)];
                    let out = channels[n - 1 - i];
                    let block = config.block(prev, out, config.layers_per_block + 1);
                    UpDecoderBlock2D::new(block, i + 1 < n, device)
                })
                .collect(),
            conv_norm_out: GroupNorm::new(config.norm_num_groups, channels[0], 1e-6, device),
            conv_out: Conv2d::new(channels[0], config.out_channels, 3, 1, 1, device),
        }
    }

    /// `[N, latent, h, w] -> [N, out_channels, H, W]`.
    pub fn forward(&self, z: Tensor<4>) -> Tensor<4> {
        let x = self.conv_in.forward(z);
        let mut x = self.mid_block.forward(x);
        for block in &self.up_blocks {
            x = block.forward(x);
        }
        self.conv_out.forward(silu(self.conv_norm_out.forward(x)))
    }
}

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

    #[test]
    fn unsupported_block_type_names_option_and_file() {
        let config = AutoencoderKLConfig {
            down_block_types: vec!["AttnDownEncoderBlock2D".to_string()],
            ..AutoencoderKLConfig::diffusers_default()
        };
        let message = config
            .validate(Path::new("vae/config.json"))
            .expect_err("unsupported")
            .to_string();
        assert!(message.contains("down_block_types"), "{message}");
        assert!(message.contains("AttnDownEncoderBlock2D"), "{message}");
        assert!(message.contains("vae/config.json"), "{message}");
    }
}
