//! `ResnetBlock2D`: diffusers' residual block (group norm, SiLU, 3x3 convs, optional time
//! embedding projection and 1x1 shortcut), `time_embedding_norm = "default"` only.

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{Device, Tensor};

use crate::nn::{Conv2d, GroupNorm, Linear};

/// Sizes of a [`ResnetBlock2D`].
#[derive(Clone, Copy, Debug)]
pub struct ResnetConfig {
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Width of the time embedding, or `None` for blocks without one (the VAE).
    pub temb_channels: Option<usize>,
    /// Groups of both group norms.
    pub groups: usize,
    /// Epsilon of both group norms.
    pub eps: f64,
    /// The output is divided by this (`output_scale_factor`).
    pub output_scale_factor: f64,
}

/// diffusers `ResnetBlock2D` with pre-norm, SiLU and `time_embedding_norm = "default"`.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    /// Group norm over the input channels.
    pub norm1: GroupNorm,
    /// 3x3 conv `in -> out`.
    pub conv1: Conv2d,
    /// `temb -> out`, added per channel after `conv1`; absent in the VAE.
    pub time_emb_proj: Option<Linear>,
    /// Group norm over the output channels.
    pub norm2: GroupNorm,
    /// 3x3 conv `out -> out`.
    pub conv2: Conv2d,
    /// 1x1 conv `in -> out` on the residual path when the channel counts differ.
    pub conv_shortcut: Option<Conv2d>,
    #[module(skip)]
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// A block of the given sizes (parameters are lazily initialised).
    pub fn new(config: ResnetConfig, device: &Device) -> Self {
        let ResnetConfig {
            in_channels,
            out_channels,
            temb_channels,
            groups,
            eps,
            output_scale_factor,
        } = config;
        Self {
            norm1: GroupNorm::new(groups, in_channels, eps, device),
            conv1: Conv2d::new(in_channels, out_channels, 3, 1, 1, device),
            time_emb_proj: temb_channels.map(|t| Linear::new(t, out_channels, true, device)),
            norm2: GroupNorm::new(groups, out_channels, eps, device),
            conv2: Conv2d::new(out_channels, out_channels, 3, 1, 1, device),
            conv_shortcut: (in_channels != out_channels)
                .then(|| Conv2d::new(in_channels, out_channels, 1, 1, 0, device)),
            output_scale_factor,
        }
    }

    /// `x: [N, C_in, H, W]`, `temb: [N, T]` (ignored when the block has no `time_emb_proj`)
    /// `-> [N, C_out, H, W]`.
    pub fn forward(&self, x: Tensor<4>, temb: Option<&Tensor<2>>) -> Tensor<4> {
        let mut hidden = self.conv1.forward(silu(self.norm1.forward(x.clone())));
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let temb = proj.forward(silu(temb.clone()));
            let [n, c] = temb.dims();
            hidden = hidden + temb.reshape([n, c, 1, 1]);
        }
        let hidden = self.conv2.forward(silu(self.norm2.forward(hidden)));
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        let out = shortcut + hidden;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::named_shapes;

    #[test]
    fn shortcut_only_when_channels_change() {
        let device = Device::flex();
        let config = ResnetConfig {
            in_channels: 8,
            out_channels: 16,
            temb_channels: Some(32),
            groups: 4,
            eps: 1e-5,
            output_scale_factor: 1.0,
        };
        let block = ResnetBlock2D::new(config, &device);
        let keys: Vec<String> = named_shapes(&block).into_iter().map(|(k, _)| k).collect();
        assert!(keys.contains(&"conv_shortcut.weight".to_string()));
        assert!(keys.contains(&"time_emb_proj.weight".to_string()));
        let x = Tensor::<4>::ones([2, 8, 4, 4], &device);
        let temb = Tensor::<2>::ones([2, 32], &device);
        assert_eq!(block.forward(x, Some(&temb)).dims(), [2, 16, 4, 4]);

        let same = ResnetBlock2D::new(
            ResnetConfig {
                in_channels: 16,
                temb_channels: None,
                ..config
            },
            &device,
        );
        let keys: Vec<String> = named_shapes(&same).into_iter().map(|(k, _)| k).collect();
        assert!(!keys
            .iter()
            .any(|k| k.starts_with("conv_shortcut") || k.starts_with("time_emb_proj")));
    }
}
