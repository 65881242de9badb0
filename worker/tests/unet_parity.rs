//! Parity of the burn `UNet2DConditionModel` with diffusers: outputs of the tiny fixture
//! pipelines, SD-1.5's parameter keys and shapes, and a save / load round trip.

mod common;

use std::collections::BTreeMap;

use burn::tensor::{Tensor, TensorData};
use common::{assert_close, device, fixture, reference};
use spin_worker::models::{UNet2DConditionConfig, UNet2DConditionModel};
use spin_worker::weights::{named_shapes, visit_named_params};

fn unet_matches_diffusers(name: &str) {
    let device = device();
    let (unet, _) =
        UNet2DConditionModel::load(&fixture(name).join("unet"), &device).expect("load unet");
    let reference = reference(name);
    let sample: Tensor<4> = reference
        .tensor("unet_sample", &device)
        .expect("unet_sample");
    let context: Tensor<3> = reference
        .tensor("unet_encoder_hidden_states", &device)
        .expect("unet_encoder_hidden_states");
    let batch = sample.dims()[0];
    let timesteps = reference
        .require("unet_timesteps")
        .expect("unet_timesteps")
        .values
        .clone();
    assert_eq!(timesteps, [1.0, 500.0, 999.0]);
    for (i, t) in timesteps.iter().enumerate() {
        let t = Tensor::<1>::from_data(TensorData::new(vec![*t; batch], [batch]), &device);
        let out = unet.forward(sample.clone(), t, context.clone());
        let key = format!("unet_out_{i}");
        let expected = reference.require(&key).expect("reference output");
        assert_close(
            out,
            expected,
            1e-4,
            &format!("{name} {key} (t = {})", timesteps[i]),
        );
    }
}

#[test]
fn tiny_a_unet_matches_diffusers() {
    unet_matches_diffusers("tiny-a");
}

#[test]
fn tiny_b_unet_matches_diffusers() {
    unet_matches_diffusers("tiny-b");
}

#[test]
fn sd15_parameter_keys_and_shapes_match_diffusers() {
    let config =
        UNet2DConditionConfig::from_file(&fixture("sd15_unet_config.json")).expect("sd15 config");
    assert_eq!(
        config,
        UNet2DConditionConfig::default(),
        "Default is SD-1.5's config"
    );
    let unet = UNet2DConditionModel::new(&config, &device()).expect("sd15 unet");
    let ours: BTreeMap<String, Vec<usize>> = named_shapes(&unet).into_iter().collect();

    let text = std::fs::read_to_string(fixture("sd15_unet_keys.json")).expect("sd15 keys");
    let list: Vec<(String, Vec<usize>)> = serde_json::from_str(&text).expect("key list");
    let theirs: BTreeMap<String, Vec<usize>> = list.into_iter().collect();

    let missing: Vec<_> = theirs
        .keys()
        .filter(|k| !ours.contains_key(*k))
        .take(10)
        .collect();
    let extra: Vec<_> = ours
        .keys()
        .filter(|k| !theirs.contains_key(*k))
        .take(10)
        .collect();
    let misshapen: Vec<_> = ours
        .iter()
        .filter(|(k, s)| theirs.get(*k).is_some_and(|t| t != *s))
        .take(10)
        .map(|(k, s)| format!("{k}: ours {s:?}, diffusers {:?}", theirs[k]))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty() && misshapen.is_empty(),
        "missing {missing:?}\nextra {extra:?}\nmisshapen {misshapen:?}"
    );
    assert_eq!(ours.len(), 686);
    let params: usize = ours.values().map(|s| s.iter().product::<usize>()).sum();
    assert_eq!(params, 859_520_964);
}

fn named_values(unet: &UNet2DConditionModel) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let mut out = BTreeMap::new();
    visit_named_params(unet, |key, value, shape| {
        let values = value.into_data().try_to_vec::<f32>().expect("f32 values");
        out.insert(key, (shape, values));
    });
    out
}

#[test]
fn save_and_load_round_trip() {
    let device = device();
    let (unet, config) =
        UNet2DConditionModel::load(&fixture("tiny-b").join("unet"), &device).expect("load");
    let dir = std::env::temp_dir().join(format!(
        "spin-unet-round-trip-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
    ));
    unet.save(&config, &dir).expect("save");
    let (reloaded, reloaded_config) = UNet2DConditionModel::load(&dir, &device).expect("reload");
    let saved_json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("config.json")).expect("config.json"),
    )
    .expect("json");
    let _ = std::fs::remove_dir_all(&dir);

    assert_eq!(reloaded_config, config);
    assert_eq!(saved_json["_class_name"], "UNet2DConditionModel");
    let (before, after) = (named_values(&unet), named_values(&reloaded));
    assert_eq!(before.len(), after.len());
    for (key, value) in &before {
        assert!(
            after.get(key) == Some(value),
            "tensor {key} differs after the round trip"
        );
    }
}
