//! Parity of the burn `AutoencoderKL` with diffusers on the tiny fixture pipelines: posterior
//! mean and log-variance of an image, and decoding of a latent.

mod common;

use burn::tensor::Tensor;
use common::{assert_close, device, fixture, reference};
use spin_worker::models::AutoencoderKL;

fn vae_matches_diffusers(name: &str) {
    let device = device();
    let (vae, config) = AutoencoderKL::load(&fixture(name).join("vae"), &device).expect("load vae");
    assert_eq!(config.scaling_factor, 0.18215);
    let reference = reference(name);

    let image: Tensor<4> = reference.tensor("vae_image", &device).expect("vae_image");
    let (mean, logvar) = vae.encode(image);
    let expected_mean = reference.require("vae_posterior_mean").expect("mean");
    let expected_logvar = reference.require("vae_posterior_logvar").expect("logvar");
    assert_close(mean, expected_mean, 1e-4, &format!("{name} posterior mean"));
    assert_close(
        logvar,
        expected_logvar,
        1e-4,
        &format!("{name} posterior logvar"),
    );

    let latents: Tensor<4> = reference
        .tensor("vae_decode_in", &device)
        .expect("vae_decode_in");
    let decoded = vae.decode(latents);
    let expected = reference.require("vae_decoded").expect("vae_decoded");
    assert_close(decoded, expected, 1e-4, &format!("{name} decoded"));
}

#[test]
fn tiny_a_vae_matches_diffusers() {
    vae_matches_diffusers("tiny-a");
}

#[test]
fn tiny_b_vae_matches_diffusers() {
    vae_matches_diffusers("tiny-b");
}
