//! diffusers `Attention` (the default `AttnProcessor2_0` path), `GEGLU`, `FeedForward` and
//! `BasicTransformerBlock` (layer-norm variant, self-attention then cross-attention then GEGLU).

use burn::module::Module;
use burn::tensor::activation::gelu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor};

use crate::nn::{GroupNorm, LayerNorm, Linear};

/// diffusers `Attention`: multi-head scaled dot-product attention with `to_q`, `to_k`, `to_v`
/// and `to_out.0` projections; the VAE variant adds a `group_norm`, works on `[N, C, H, W]`
/// maps and adds the residual.
#[derive(Module, Debug)]
pub struct Attention {
    /// Group norm applied to the input before the projections (VAE mid-block only).
    pub group_norm: Option<GroupNorm>,
    /// `query_dim -> heads * dim_head`.
    pub to_q: Linear,
    /// `cross_attention_dim -> heads * dim_head`.
    pub to_k: Linear,
    /// `cross_attention_dim -> heads * dim_head`.
    pub to_v: Linear,
    /// `heads * dim_head -> query_dim`, with bias (`to_out.0`).
    pub to_out_0: Linear,
    #[module(skip)]
    heads: usize,
    #[module(skip)]
    dim_head: usize,
    #[module(skip)]
    rescale_output_factor: f64,
}

impl Attention {
    /// The transformer-block attention: projections without bias except `to_out.0`; keys and
    /// values come from `cross_attention_dim` features (`None`: self-attention, `query_dim`).
    pub fn new(
        query_dim: usize,
        cross_attention_dim: Option<usize>,
        heads: usize,
        dim_head: usize,
        device: &Device,
    ) -> Self {
        let inner = heads * dim_head;
        let kv_dim = cross_attention_dim.unwrap_or(query_dim);
        Self {
            group_norm: None,
            to_q: Linear::new(query_dim, inner, false, device),
            to_k: Linear::new(kv_dim, inner, false, device),
            to_v: Linear::new(kv_dim, inner, false, device),
            to_out_0: Linear::new(inner, query_dim, true, device),
            heads,
            dim_head,
            rescale_output_factor: 1.0,
        }
    }

    /// The VAE mid-block attention (`_from_deprecated_attn_block`): group norm first, biased
    /// projections, residual connection, output divided by `rescale_output_factor`.
    pub fn new_spatial(
        channels: usize,
        dim_head: usize,
        groups: usize,
        eps: f64,
        rescale_output_factor: f64,
        device: &Device,
    ) -> Self {
        let heads = (channels / dim_head.max(1)).max(1);
        let inner = heads * dim_head;
        Self {
            group_norm: Some(GroupNorm::new(groups, channels, eps, device)),
            to_q: Linear::new(channels, inner, true, device),
            to_k: Linear::new(channels, inner, true, device),
            to_v: Linear::new(channels, inner, true, device),
            to_out_0: Linear::new(inner, channels, true, device),
            heads,
            dim_head,
            rescale_output_factor,
        }
    }

    /// Number of heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Width of one head.
    pub fn dim_head(&self) -> usize {
        self.dim_head
    }

    /// `x: [N, L, query_dim]`, `context: [N, S, cross_attention_dim]` (`None`: self-attention)
    /// `-> [N, L, query_dim]`.
    pub fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        let context = context.unwrap_or_else(|| x.clone());
        let q = self.to_q.forward(x);
        let k = self.to_k.forward(context.clone());
        let v = self.to_v.forward(context);
        self.to_out_0.forward(self.attend(q, k, v))
    }

    /// Self-attention over the pixels of `x: [N, C, H, W] -> [N, C, H, W]` (VAE mid-block):
    /// `(x + to_out(attn(group_norm(x)))) / rescale_output_factor`.
    pub fn forward_spatial(&self, x: Tensor<4>) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        let normed = match &self.group_norm {
            Some(norm) => norm.forward(x.clone()),
            None => x.clone(),
        };
        let tokens = normed.reshape([n, c, h * w]).swap_dims(1, 2);
        let out = self.forward(tokens, None);
        let out = out.swap_dims(1, 2).reshape([n, c, h, w]) + x;
        if self.rescale_output_factor == 1.0 {
            out
        } else {
            out / self.rescale_output_factor
        }
    }

    /// `softmax(q k^T / sqrt(dim_head)) v` per head: `[N, L, H*D], [N, S, H*D] -> [N, L, H*D]`.
    fn attend(&self, q: Tensor<3>, k: Tensor<3>, v: Tensor<3>) -> Tensor<3> {
        let [n, l, _] = q.dims();
        let s = k.dims()[1];
        let (heads, dim_head) = (self.heads, self.dim_head);
        let split = |t: Tensor<3>, len: usize| t.reshape([n, len, heads, dim_head]).swap_dims(1, 2);
        let options = AttentionModuleOptions {
            scale: Some(1.0 / (dim_head as f64).sqrt()),
            softcap: None,
            is_causal: false,
        };
        let out = attention(split(q, l), split(k, s), split(v, s), None, None, options);
        out.swap_dims(1, 2).reshape([n, l, heads * dim_head])
    }
}

/// diffusers `GEGLU`: `hidden, gate = proj(x).chunk(2); hidden * gelu(gate)` (exact erf GELU).
#[derive(Module, Debug)]
pub struct Geglu {
    /// `dim -> 2 * inner`.
    pub proj: Linear,
}

impl Geglu {
    /// A GEGLU `dim_in -> dim_out`.
    pub fn new(dim_in: usize, dim_out: usize, device: &Device) -> Self {
        Self {
            proj: Linear::new(dim_in, 2 * dim_out, true, device),
        }
    }

    /// `[..., dim_in] -> [..., dim_out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let projected = self.proj.forward(x);
        let half = projected.dims()[D - 1] / 2;
        let hidden = projected.clone().narrow(D - 1, 0, half);
        let gate = projected.narrow(D - 1, half, half);
        hidden * gelu(gate)
    }
}

/// diffusers `FeedForward` with the GEGLU activation: `net.0` (GEGLU) then `net.2` (Linear);
/// `net.1` is a dropout and has no parameters.
#[derive(Module, Debug)]
pub struct FeedForward {
    /// `dim -> inner` gated (`net.0`).
    pub net_0: Geglu,
    /// `inner -> dim` (`net.2`).
    pub net_2: Linear,
}

impl FeedForward {
    /// A feed-forward `dim -> mult * dim -> dim`.
    pub fn new(dim: usize, mult: usize, device: &Device) -> Self {
        let inner = dim * mult;
        Self {
            net_0: Geglu::new(dim, inner, device),
            net_2: Linear::new(inner, dim, true, device),
        }
    }

    /// `[..., dim] -> [..., dim]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.net_2.forward(self.net_0.forward(x))
    }
}

/// diffusers `BasicTransformerBlock` (`norm_type = "layer_norm"`, GEGLU): pre-norm
/// self-attention, cross-attention on the text states, then feed-forward, each residual.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    /// Layer norm before self-attention.
    pub norm1: LayerNorm,
    /// Self-attention.
    pub attn1: Attention,
    /// Layer norm before cross-attention.
    pub norm2: LayerNorm,
    /// Cross-attention on the encoder hidden states.
    pub attn2: Attention,
    /// Layer norm before the feed-forward.
    pub norm3: LayerNorm,
    /// GEGLU feed-forward.
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    /// A block of width `dim = heads * dim_head` attending to `cross_attention_dim` features.
    pub fn new(
        dim: usize,
        heads: usize,
        dim_head: usize,
        cross_attention_dim: usize,
        norm_eps: f64,
        device: &Device,
    ) -> Self {
        Self {
            norm1: LayerNorm::new(dim, norm_eps, device),
            attn1: Attention::new(dim, None, heads, dim_head, device),
            norm2: LayerNorm::new(dim, norm_eps, device),
            attn2: Attention::new(dim, Some(cross_attention_dim), heads, dim_head, device),
            norm3: LayerNorm::new(dim, norm_eps, device),
            ff: FeedForward::new(dim, 4, device),
        }
    }

    /// `x: [N, L, dim]`, `context: [N, S, cross_attention_dim]` `-> [N, L, dim]`.
    pub fn forward(&self, x: Tensor<3>, context: &Tensor<3>) -> Tensor<3> {
        let x = self.attn1.forward(self.norm1.forward(x.clone()), None) + x;
        let x = self
            .attn2
            .forward(self.norm2.forward(x.clone()), Some(context.clone()))
            + x;
        self.ff.forward(self.norm3.forward(x.clone())) + x
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::softmax;
    use burn::tensor::Distribution;

    fn max_abs(a: Tensor<3>, b: Tensor<3>) -> f32 {
        (a - b).abs().max().into_scalar::<f32>()
    }

    #[test]
    fn fused_attention_matches_matmul_softmax() {
        let device = Device::flex();
        let attn = Attention::new(16, Some(12), 2, 8, &device);
        let x = Tensor::<3>::random([2, 5, 16], Distribution::Normal(0.0, 1.0), &device);
        let ctx = Tensor::<3>::random([2, 7, 12], Distribution::Normal(0.0, 1.0), &device);
        let fused = attn.forward(x.clone(), Some(ctx.clone()));

        let heads = |t: Tensor<3>, len: usize| t.reshape([2, len, 2, 8]).swap_dims(1, 2);
        let q = heads(attn.to_q.forward(x), 5);
        let k = heads(attn.to_k.forward(ctx.clone()), 7);
        let v = heads(attn.to_v.forward(ctx), 7);
        let scores = q.matmul(k.swap_dims(2, 3)) / (8f64).sqrt();
        let out = softmax(scores, 3)
            .matmul(v)
            .swap_dims(1, 2)
            .reshape([2, 5, 16]);
        let reference = attn.to_out_0.forward(out);
        assert!(max_abs(fused, reference) < 1e-5);
    }

    #[test]
    fn geglu_gates_with_exact_gelu() {
        let device = Device::flex();
        let geglu = Geglu::new(3, 2, &device);
        let x = Tensor::<3>::random([1, 4, 3], Distribution::Normal(0.0, 1.0), &device);
        let projected = geglu.proj.forward(x.clone());
        let hidden = projected.clone().narrow(2, 0, 2);
        let gate = projected.narrow(2, 2, 2);
        let erf_gelu = gate.clone() * ((gate / std::f64::consts::SQRT_2).erf() + 1.0) * 0.5;
        assert!(max_abs(geglu.forward(x), hidden * erf_gelu) < 1e-6);
    }
}
