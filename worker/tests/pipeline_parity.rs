//! Parity of the whole text-to-image pipeline with diffusers: 10 DDIM steps with guidance 7.5
//! from given initial latents, with and without a negative prompt, then the VAE decode.

mod common;

use burn::tensor::Tensor;
use common::{assert_close, device, fixture, reference};
use spin_worker::pipeline::{SampleOptions, StableDiffusion};
use spin_worker::schedulers::DdimScheduler;

const PROMPT: &str = "a red circle on a blue background";

fn options() -> SampleOptions {
    SampleOptions {
        steps: 10,
        guidance: 7.5,
        eta: 0.0,
        seed: 0,
    }
}

#[test]
fn ddim_timesteps_match_diffusers() {
    for name in ["tiny-a", "tiny-b"] {
        let pipeline = StableDiffusion::load(&fixture(name), &device()).expect("load");
        let expected: Vec<usize> = reference(name)
            .require("ddim_timesteps")
            .expect("timesteps")
            .values
            .iter()
            .map(|&v| v as usize)
            .collect();
        let ddim = DdimScheduler::new(&pipeline.scheduler_config, 10);
        assert_eq!(ddim.timesteps(), expected.as_slice(), "{name}");
    }
}

#[test]
fn ten_step_guided_sample_matches_diffusers() {
    let device = device();
    for name in ["tiny-a", "tiny-b"] {
        let reference = reference(name);
        let pipeline = StableDiffusion::load(&fixture(name), &device).expect("load");
        let init: Tensor<4> = reference
            .tensor("ddim_init_latents", &device)
            .expect("init");
        let mut steps_seen = 0;
        let latents = pipeline
            .sample_latents(PROMPT, None, init.clone(), &options(), |step, _| {
                steps_seen = step
            })
            .expect("sample");
        assert_eq!(steps_seen, 10);
        let expected = reference.require("ddim_latents").expect("ddim_latents");
        assert_close(
            latents.clone(),
            expected,
            1e-3,
            &format!("{name} 10-step latents"),
        );

        let image = pipeline.decode_latents(latents);
        let expected = reference.require("ddim_image").expect("ddim_image");
        assert_close(image, expected, 1e-3, &format!("{name} decoded image"));

        let negative = pipeline
            .sample_latents(PROMPT, Some("blurry"), init, &options(), |_, _| {})
            .expect("sample");
        let expected = reference
            .require("ddim_negative_latents")
            .expect("negative");
        assert_close(
            negative,
            expected,
            1e-3,
            &format!("{name} negative-prompt latents"),
        );
    }
}
