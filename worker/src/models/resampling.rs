//! diffusers `Downsample2D` (stride-2 3x3 conv) and `Upsample2D` (nearest 2x, then 3x3 conv).

use burn::module::Module;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions, PadMode};
use burn::tensor::{Device, Tensor};

use crate::nn::Conv2d;

/// diffusers `Downsample2D` with `use_conv = True`: a 3x3 stride-2 conv. With `padding = 0`
/// (the VAE) the input is first padded by one zero row and column at the bottom and right.
#[derive(Module, Debug)]
pub struct Downsample2D {
    /// The stride-2 conv.
    pub conv: Conv2d,
    #[module(skip)]
    padding: usize,
}

impl Downsample2D {
    /// A downsampler `channels -> out_channels` with the given conv `padding`.
    pub fn new(channels: usize, out_channels: usize, padding: usize, device: &Device) -> Self {
        Self {
            conv: Conv2d::new(channels, out_channels, 3, 2, padding, device),
            padding,
        }
    }

    /// `[N, C, H, W] -> [N, C_out, H', W']` with `H' = floor((H + 2p - 3) / 2) + 1`, or
    /// `H' = floor(H / 2)` for `p = 0` (one row and column of zeros added after).
    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = if self.padding == 0 {
            x.pad((0, 1, 0, 1), PadMode::Constant(0.0))
        } else {
            x
        };
        self.conv.forward(x)
    }
}

/// diffusers `Upsample2D` with `use_conv = True`: nearest-neighbour upsampling (2x, or to an
/// explicit size) followed by a 3x3 conv.
#[derive(Module, Debug)]
pub struct Upsample2D {
    /// The 3x3 conv after upsampling.
    pub conv: Conv2d,
}

impl Upsample2D {
    /// An upsampler `channels -> out_channels`.
    pub fn new(channels: usize, out_channels: usize, device: &Device) -> Self {
        Self {
            conv: Conv2d::new(channels, out_channels, 3, 1, 1, device),
        }
    }

    /// `[N, C, H, W] -> [N, C_out, 2H, 2W]`, or `[N, C_out, size[0], size[1]]` when
    /// `output_size` is given (the UNet does so when the input is not a multiple of its
    /// overall downsampling factor).
    pub fn forward(&self, x: Tensor<4>, output_size: Option<[usize; 2]>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let size = output_size.unwrap_or([2 * h, 2 * w]);
        let upsampled = interpolate(
            x,
            InterpolateOptions::new(InterpolateMode::Nearest).with_output_size(size),
        );
        self.conv.forward(upsampled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn nearest_upsampling_repeats_pixels() {
        let device = Device::flex();
        let x = Tensor::<4>::from_data(
            TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0], [1, 1, 2, 2]),
            &device,
        );
        let options = InterpolateOptions::new(InterpolateMode::Nearest).with_output_size([4, 4]);
        let y = interpolate(x, options)
            .into_data()
            .try_to_vec::<f32>()
            .expect("f32");
        let expected = [
            1.0, 1.0, 2.0, 2.0, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0, 4.0, 4.0, 3.0, 3.0, 4.0, 4.0,
        ];
        assert_eq!(y, expected);
    }

    #[test]
    fn downsampling_output_sizes() {
        let device = Device::flex();
        for (padding, odd_out) in [(0, 3), (1, 4)] {
            let down = Downsample2D::new(2, 3, padding, &device);
            let even = down.forward(Tensor::<4>::ones([1, 2, 8, 8], &device));
            assert_eq!(even.dims(), [1, 3, 4, 4]);
            let odd = down.forward(Tensor::<4>::ones([1, 2, 7, 7], &device));
            assert_eq!(odd.dims(), [1, 3, odd_out, odd_out]);
        }
    }
}
