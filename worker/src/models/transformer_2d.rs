//! diffusers `Transformer2DModel` for continuous inputs: group norm, `proj_in` (1x1 conv or
//! linear), a stack of `BasicTransformerBlock`s, `proj_out`, plus the residual.

use burn::module::Module;
use burn::tensor::{Device, Tensor};

use super::attention::BasicTransformerBlock;
use crate::nn::{Conv2d, GroupNorm, Linear};

/// `proj_in` / `proj_out`: a 1x1 convolution, or a linear layer when
/// `use_linear_projection` (the variant name is not part of the parameter path).
#[derive(Module, Debug)]
pub enum Projection {
    /// 1x1 `Conv2d` on `[N, C, H, W]`.
    Conv(Conv2d),
    /// `Linear` on `[N, H*W, C]`.
    Linear(Linear),
}

/// Sizes of a [`Transformer2DModel`].
#[derive(Clone, Copy, Debug)]
pub struct Transformer2DConfig {
    /// Attention heads.
    pub heads: usize,
    /// Width of one head; `heads * dim_head` is the transformer width.
    pub dim_head: usize,
    /// Channels of the feature map (in and out).
    pub in_channels: usize,
    /// Number of `BasicTransformerBlock`s (`transformer_layers_per_block`).
    pub num_layers: usize,
    /// Width of the encoder hidden states.
    pub cross_attention_dim: usize,
    /// Groups of the input group norm (eps 1e-6).
    pub norm_num_groups: usize,
    /// Linear instead of 1x1-conv projections.
    pub use_linear_projection: bool,
}

/// diffusers `Transformer2DModel` (continuous input, `norm_type = "layer_norm"`).
#[derive(Module, Debug)]
pub struct Transformer2DModel {
    /// Group norm over the input channels (eps 1e-6).
    pub norm: GroupNorm,
    /// `in_channels -> inner_dim`.
    pub proj_in: Projection,
    /// The transformer blocks.
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    /// `inner_dim -> in_channels`.
    pub proj_out: Projection,
}

impl Transformer2DModel {
    /// A transformer of the given sizes (parameters are lazily initialised).
    pub fn new(config: Transformer2DConfig, device: &Device) -> Self {
        let inner = config.heads * config.dim_head;
        let channels = config.in_channels;
        let projection = |from: usize, to: usize| {
            if config.use_linear_projection {
                Projection::Linear(Linear::new(from, to, true, device))
            } else {
                Projection::Conv(Conv2d::new(from, to, 1, 1, 0, device))
            }
        };
        Self {
            norm: GroupNorm::new(config.norm_num_groups, channels, 1e-6, device),
            proj_in: projection(channels, inner),
            transformer_blocks: (0..config.num_layers)
                .map(|_| {
                    BasicTransformerBlock::new(
                        inner,
                        config.heads,
                        config.dim_head,
                        config.cross_attention_dim,
                        1e-5,
                        device,
                    )
                })
                .collect(),
            proj_out: projection(inner, channels),
        }
    }

    /// `x: [N, C, H, W]`, `context: [N, S, cross_attention_dim]` `-> [N, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>, context: &Tensor<3>) -> Tensor<4> {
        let [n, _, h, w] = x.dims();
        let normed = self.norm.forward(x.clone());
        // [N, C, H, W] -> tokens [N, H*W, inner]
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(normed)),
            Projection::Linear(linear) => linear.forward(to_tokens(normed)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context);
        }
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(to_map(tokens, h, w)),
            Projection::Linear(linear) => to_map(linear.forward(tokens), h, w),
        };
        debug_assert_eq!(out.dims()[0], n);
        out + x
    }
}

/// `[N, C, H, W] -> [N, H*W, C]`.
fn to_tokens(x: Tensor<4>) -> Tensor<3> {
    let [n, c, h, w] = x.dims();
    x.permute([0, 2, 3, 1]).reshape([n, h * w, c])
}

/// `[N, H*W, C] -> [N, C, H, W]`.
fn to_map(x: Tensor<3>, h: usize, w: usize) -> Tensor<4> {
    let [n, _, c] = x.dims();
    x.reshape([n, h, w, c]).permute([0, 3, 1, 2])
}
