//! Parity of the burn `AutoencoderKL` with diffusers on the tiny fixture pipelines: posterior
//! mean and log-variance of an image, decoding of a latent, and legacy attention key names.

mod common;

use std::collections::BTreeMap;

use burn::tensor::Tensor;
use common::{assert_close, device, fixture, reference};
use spin_worker::models::AutoencoderKL;
use spin_worker::weights::{write_safetensors, WeightFile};

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

/// Checkpoints saved before diffusers renamed the VAE attention (`query`, `key`, `value`,
/// `proj_attn`, sometimes as 1x1-conv weights) load as the current names.
#[test]
fn legacy_attention_names_load() {
    let device = device();
    let source = fixture("tiny-a").join("vae");
    let file =
        WeightFile::open(&source.join("diffusion_pytorch_model.safetensors")).expect("vae weights");
    let mut tensors = BTreeMap::new();
    for key in file.keys() {
        let stored = file.require(key).expect("tensor");
        let mut shape = stored.shape.clone();
        let mut name = key.to_string();
        if key.contains(".mid_block.attentions.0.") {
            for (new, old) in [
                (".to_q.", ".query."),
                (".to_k.", ".key."),
                (".to_v.", ".value."),
                (".to_out.0.", ".proj_attn."),
            ] {
                name = name.replace(new, old);
            }
            if shape.len() == 2 {
                shape.extend([1, 1]);
            }
        }
        tensors.insert(name, (shape, stored.values.clone()));
    }
    assert!(tensors.contains_key("encoder.mid_block.attentions.0.proj_attn.weight"));
    let dir = std::env::temp_dir().join(format!("spin-legacy-vae-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::copy(source.join("config.json"), dir.join("config.json")).expect("copy config");
    write_safetensors(
        &dir.join("diffusion_pytorch_model.safetensors"),
        &tensors,
        None,
    )
    .expect("write");
    let loaded = AutoencoderKL::load(&dir, &device);
    let _ = std::fs::remove_dir_all(&dir);
    let (vae, _) = loaded.expect("legacy vae");

    let reference = reference("tiny-a");
    let image: Tensor<4> = reference.tensor("vae_image", &device).expect("vae_image");
    let (mean, _) = vae.encode(image);
    let expected = reference.require("vae_posterior_mean").expect("mean");
    assert_close(mean, expected, 1e-4, "tiny-a posterior mean, legacy names");
}
