//! Basic layers with PyTorch's parameter names and layouts (`weight` / `bias`, Linear weight
//! `[out, in]`), so that every parameter path of a model is its diffusers / transformers key.

use burn::module::{Module, Param, ParamId};
use burn::tensor::module::{conv2d, embedding};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Distribution, Int, Shape, Tensor};

/// How fresh parameters are filled before weights are loaded (or when training from scratch).
#[derive(Clone, Copy, Debug)]
enum Fill {
    /// PyTorch's default for Linear / Conv: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    FanIn(usize),
    Ones,
    Zeros,
    /// N(0, std): embeddings.
    Normal(f64),
}

/// A lazily initialised parameter: nothing is allocated until the value is read, so a model
/// can be built from its config and then filled from a weight file without a second copy.
fn lazy_param<const D: usize>(shape: [usize; D], fill: Fill, device: &Device) -> Param<Tensor<D>> {
    Param::uninitialized(
        ParamId::new(),
        move |device, require_grad| {
            let tensor = match fill {
                Fill::FanIn(fan_in) => {
                    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
                    Tensor::random(shape, Distribution::Uniform(-bound, bound), device)
                }
                Fill::Ones => Tensor::ones(shape, device),
                Fill::Zeros => Tensor::zeros(shape, device),
                Fill::Normal(std) => Tensor::random(shape, Distribution::Normal(0.0, std), device),
            };
            if require_grad {
                tensor.require_grad()
            } else {
                tensor
            }
        },
        device.clone(),
        true,
        Shape::new(shape),
    )
}

/// `torch.nn.Linear`: `y = x W^T + b`, weight `[out, in]`.
#[derive(Module, Debug)]
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Param<Tensor<2>>,
    /// `[out_features]`.
    pub bias: Option<Param<Tensor<1>>>,
}

impl Linear {
    /// A layer of the given sizes, with or without bias.
    pub fn new(in_features: usize, out_features: usize, bias: bool, device: &Device) -> Self {
        Self {
            weight: lazy_param(
                [out_features, in_features],
                Fill::FanIn(in_features),
                device,
            ),
            bias: bias.then(|| lazy_param([out_features], Fill::FanIn(in_features), device)),
        }
    }

    /// `[..., in] -> [..., out]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let weight = self.weight.val().transpose();
        burn::tensor::module::linear(x, weight, self.bias.as_ref().map(|b| b.val()))
    }
}

/// `torch.nn.Conv2d` with square kernel, stride and padding, no dilation or groups.
#[derive(Module, Debug)]
pub struct Conv2d {
    /// `[out_channels, in_channels, k, k]`.
    pub weight: Param<Tensor<4>>,
    /// `[out_channels]`.
    pub bias: Option<Param<Tensor<1>>>,
    #[module(skip)]
    stride: usize,
    #[module(skip)]
    padding: usize,
}

impl Conv2d {
    /// A convolution `in_channels -> out_channels` with a `kernel x kernel` window.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        device: &Device,
    ) -> Self {
        let fan_in = in_channels * kernel * kernel;
        Self {
            weight: lazy_param(
                [out_channels, in_channels, kernel, kernel],
                Fill::FanIn(fan_in),
                device,
            ),
            bias: Some(lazy_param([out_channels], Fill::FanIn(fan_in), device)),
            stride,
            padding,
        }
    }

    /// `[N, C_in, H, W] -> [N, C_out, H', W']`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let options = ConvOptions::new(
            [self.stride, self.stride],
            [self.padding, self.padding],
            [1, 1],
            1,
        );
        conv2d(
            x,
            self.weight.val(),
            self.bias.as_ref().map(|b| b.val()),
            options,
        )
    }
}

/// `torch.nn.GroupNorm` over `[N, C, ...]` inputs (here `[N, C, H, W]`).
#[derive(Module, Debug)]
pub struct GroupNorm {
    /// `[C]`.
    pub weight: Param<Tensor<1>>,
    /// `[C]`.
    pub bias: Param<Tensor<1>>,
    #[module(skip)]
    num_groups: usize,
    #[module(skip)]
    eps: f64,
}

impl GroupNorm {
    /// A group norm of `channels` channels in `num_groups` groups.
    pub fn new(num_groups: usize, channels: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: lazy_param([channels], Fill::Ones, device),
            bias: lazy_param([channels], Fill::Zeros, device),
            num_groups,
            eps,
        }
    }

    /// `[N, C, H, W] -> [N, C, H, W]`.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [n, c, h, w] = x.dims();
        let grouped = x.reshape([n, self.num_groups, (c / self.num_groups) * h * w]);
        let (var, mean) = grouped.clone().var_mean_bias(2);
        let normed = (grouped - mean) / (var + self.eps).sqrt();
        let normed = normed.reshape([n, c, h, w]);
        let weight = self.weight.val().reshape([1, c, 1, 1]);
        let bias = self.bias.val().reshape([1, c, 1, 1]);
        normed * weight + bias
    }
}

/// `torch.nn.LayerNorm` over the last dimension.
#[derive(Module, Debug)]
pub struct LayerNorm {
    /// `[D]`.
    pub weight: Param<Tensor<1>>,
    /// `[D]`.
    pub bias: Param<Tensor<1>>,
    #[module(skip)]
    eps: f64,
}

impl LayerNorm {
    /// A layer norm over `dim` features.
    pub fn new(dim: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: lazy_param([dim], Fill::Ones, device),
            bias: lazy_param([dim], Fill::Zeros, device),
            eps,
        }
    }

    /// `[..., D] -> [..., D]`.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let (var, mean) = x.clone().var_mean_bias(D - 1);
        let normed = (x - mean) / (var + self.eps).sqrt();
        normed * self.weight.val().unsqueeze() + self.bias.val().unsqueeze()
    }
}

/// `torch.nn.Embedding`.
#[derive(Module, Debug)]
pub struct Embedding {
    /// `[num_embeddings, dim]`.
    pub weight: Param<Tensor<2>>,
}

impl Embedding {
    /// A table of `num_embeddings` vectors of `dim` features.
    pub fn new(num_embeddings: usize, dim: usize, device: &Device) -> Self {
        Self {
            weight: lazy_param([num_embeddings, dim], Fill::Normal(0.02), device),
        }
    }

    /// `[N, L]` ids -> `[N, L, dim]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        embedding(self.weight.val(), ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    fn device() -> Device {
        Device::flex()
    }

    #[test]
    fn linear_uses_pytorch_layout() {
        let device = device();
        let mut layer = Linear::new(2, 3, true, &device);
        layer.weight = Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0], [3, 2]),
            &device,
        ));
        layer.bias = Some(Param::from_tensor(Tensor::from_data(
            TensorData::new(vec![0.5f32, 0.0, -1.0], [3]),
            &device,
        )));
        let x = Tensor::<2>::from_data(TensorData::new(vec![2.0f32, 3.0], [1, 2]), &device);
        let y = layer
            .forward(x)
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32");
        assert_eq!(y, vec![2.5, 3.0, 4.0]);
    }

    #[test]
    fn group_norm_normalises_each_group() {
        let device = device();
        let norm = GroupNorm::new(2, 4, 1e-5, &device);
        let x = Tensor::<4>::random([2, 4, 3, 3], Distribution::Normal(3.0, 2.0), &device);
        let y = norm.forward(x).reshape([2, 2, 18]);
        let mean = y.clone().mean_dim(2).abs().max().into_scalar::<f32>();
        let var = y.var_bias(2).into_data().try_to_vec::<f32>().expect("f32");
        assert!(mean < 1e-5, "group mean {mean}");
        assert!(
            var.iter().all(|v| (v - 1.0).abs() < 1e-3),
            "group var {var:?}"
        );
    }
}
