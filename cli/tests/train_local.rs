//! `spinctl train --local` end to end on the synthetic data: a SPIN iteration from a random toy
//! pipeline writes a verified snapshot and metrics, and `spinctl sample` loads the snapshot.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn spinctl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spinctl"))
        .args(args)
        .output()
        .expect("spinctl runs")
}

fn ok(output: Output, what: &str) -> Output {
    assert!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn spec(dir: &Path, objective: &str) -> PathBuf {
    let text = format!(
        "[job]\nname = \"it-{objective}\"\nseed = 1\noutput = \"out-{objective}\"\n\
         [model]\nbase = \"init\"\n[data]\ntrain = [\"data\"]\nresolution = 32\nheld_out_fraction = 0.2\nmax_prompts = 6\n\
         [sampling]\nsteps = 2\nguidance = 3.0\nbatch_size = 8\n\
         [training]\nobjective = \"{objective}\"\nbatch_size = 2\ngradient_accumulation = 2\nwarmup_steps = 1\n\
         [[iteration]]\nlr = 1e-4\nbeta = 2000.0\nsteps = 2\n[eval]\nsamples = 4\nloss_timesteps = 2\ngrid_columns = 2\n"
    );
    let path = dir.join(format!("{objective}.toml"));
    std::fs::write(&path, text).expect("write spec");
    path
}

#[test]
fn local_spin_run_publishes_a_loadable_snapshot() {
    let dir = std::env::temp_dir().join(format!("spinctl-train-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    ok(
        spinctl(&[
            "make-toy-dataset",
            "--out",
            path(&dir.join("data")),
            "--rows",
            "40",
        ]),
        "make-toy-dataset",
    );
    ok(
        spinctl(&["init-toy-model", "--out", path(&dir.join("init"))]),
        "init-toy-model",
    );

    for objective in ["spin", "spin-trajectory"] {
        let output = ok(
            spinctl(&["train", "--local", path(&spec(&dir, objective))]),
            objective,
        );
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(stdout.contains("done"), "{stdout}");
        let snapshot = dir.join(format!("out-{objective}/iteration-1"));
        spin_common::manifest::verify(&snapshot).expect("snapshot manifest verifies");
        let metrics: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("out-{objective}/metrics.json")))
                .expect("metrics"),
        )
        .expect("json");
        assert_eq!(
            metrics.as_array().map(Vec::len),
            Some(2),
            "base + one iteration"
        );
        assert!(metrics[1]["held_out_loss"]
            .as_f64()
            .is_some_and(f64::is_finite));
        assert!(dir
            .join(format!("out-{objective}/eval-1/samples.png"))
            .exists());

        let png = dir.join(format!("{objective}.png"));
        ok(
            spinctl(&[
                "sample",
                "--model",
                path(&snapshot),
                "--prompt",
                "a red circle on a blue background",
                "--steps",
                "2",
                "--out",
                path(&png),
            ]),
            "sample from snapshot",
        );
        assert!(png.exists());
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_spec_exits_2_naming_the_field() {
    let dir = std::env::temp_dir().join(format!("spinctl-badspec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let spec = dir.join("bad.toml");
    std::fs::write(
        &spec,
        "[model]\nbase = \"x\"\n[data]\ntrain = [\"d\"]\n[training]\nobjectiv = \"spin\"\n",
    )
    .expect("write");
    let output = spinctl(&["train", "--local", path(&spec)]);
    assert_eq!(output.status.code(), Some(2));
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(err.contains("objectiv"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}
