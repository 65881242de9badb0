//! `spinctl sample` end to end: the binary reproduces diffusers' 10-step guided sample from the
//! fixture's initial latents, writes a PNG and the final latents.

use std::path::PathBuf;
use std::process::Command;

use spin_worker::weights::WeightFile;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../worker/tests/fixtures")
        .join(name)
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("spinctl-sample-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

#[test]
fn sample_with_given_latents_matches_diffusers() {
    let dir = scratch("parity");
    let reference =
        WeightFile::open(&fixture("tiny-a").join("reference.safetensors")).expect("reference");
    let init = reference.require("ddim_init_latents").expect("init");
    let tensors = [(
        "latents".to_string(),
        (init.shape.clone(), init.values.clone()),
    )]
    .into_iter()
    .collect();
    let init_path = dir.join("init.safetensors");
    spin_worker::weights::write_safetensors(&init_path, &tensors, None).expect("write init");

    let out = dir.join("out.png");
    let saved = dir.join("final.safetensors");
    let status = Command::new(env!("CARGO_BIN_EXE_spinctl"))
        .args(["sample", "--model"])
        .arg(fixture("tiny-a"))
        .args([
            "--prompt",
            "a red circle on a blue background",
            "--steps",
            "10",
            "--guidance",
            "7.5",
        ])
        .arg("--latents")
        .arg(&init_path)
        .arg("--save-latents")
        .arg(&saved)
        .arg("--out")
        .arg(&out)
        .status()
        .expect("spinctl runs");
    assert!(status.success());

    let png = image::open(&out).expect("png").to_rgb8();
    assert_eq!(png.dimensions(), (32, 32));
    let latents = WeightFile::open(&saved).expect("saved latents");
    let latents = latents.require("latents").expect("latents");
    let expected = reference.require("ddim_latents").expect("expected");
    assert_eq!(latents.shape, expected.shape);
    let diff = latents
        .values
        .iter()
        .zip(&expected.values)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff <= 1e-3, "max abs error {diff}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_inputs_exit_2_with_a_named_error() {
    let dir = scratch("bad");
    let run = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_spinctl"))
            .args(args)
            .output()
            .expect("runs");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let out = dir.join("x.png");
    let out = out.to_str().expect("utf-8");
    let missing = dir.join("no-such-model");
    let (code, err) = run(&[
        "sample",
        "--model",
        missing.to_str().expect("utf-8"),
        "--prompt",
        "x",
        "--out",
        out,
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("model_index.json"), "{err}");

    let model = fixture("tiny-a");
    let (code, err) = run(&[
        "sample",
        "--model",
        model.to_str().expect("utf-8"),
        "--prompt",
        "x",
        "--out",
        out,
        "--steps",
        "0",
    ]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--steps"), "{err}");

    let wrong = dir.join("wrong.safetensors");
    let tensors = [(
        "latents".to_string(),
        (vec![1, 3, 16, 16], vec![0.0f32; 768]),
    )]
    .into_iter()
    .collect();
    spin_worker::weights::write_safetensors(&wrong, &tensors, None).expect("write");
    let (code, err) = run(&[
        "sample",
        "--model",
        model.to_str().expect("utf-8"),
        "--prompt",
        "x",
        "--out",
        out,
        "--latents",
        wrong.to_str().expect("utf-8"),
    ]);
    assert_eq!(code, Some(2));
    assert!(
        err.contains("latents") && err.contains("[1, 3, 16, 16]"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).ok();
}
