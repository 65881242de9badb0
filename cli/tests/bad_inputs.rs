//! Bad inputs to the binaries: `spinctl sample` and `spinctl train --local` with missing or
//! malformed files and flags, `spin-worker` with a bad listen address, device or coordinator,
//! `spin-coordinator` with a bad settings file. Each must exit 2 with an error naming the
//! thing, never panic, and leave no output behind. The table in `docs/bad-inputs.md` points at
//! these tests.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The longest any one binary may run here.
const TIMEOUT: Duration = Duration::from_secs(60);

/// A fresh folder under the system temp dir, unique per process and call, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "spin-cli-bad-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a finished binary gave.
#[derive(Debug)]
struct Ran {
    code: Option<i32>,
    stderr: String,
}

impl Ran {
    /// Exit code 2, no panic, and every one of `things` named on stderr.
    fn refused(&self, things: &[&str]) {
        eprintln!("{}", self.stderr);
        assert_eq!(self.code, Some(2), "{self:?}");
        assert!(!self.stderr.contains("panicked at"), "{self:?}");
        for thing in things {
            assert!(self.stderr.contains(thing), "{thing:?} not named: {self:?}");
        }
    }
}

/// Runs `binary` with `args` (killed after [`TIMEOUT`]), without the caller's `SPIN_*`
/// environment.
fn run(binary: impl AsRef<Path>, args: &[&str]) -> Ran {
    let binary = binary.as_ref().display().to_string();
    let mut command = Command::new(&binary);
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (key, _) in std::env::vars() {
        if key.starts_with("SPIN_") {
            command.env_remove(key);
        }
    }
    let mut child = command.spawn().unwrap();
    let mut pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = pipe.read_to_string(&mut text);
        text
    });
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{binary} {args:?} ran past {TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ran {
        code: status.code(),
        stderr: reader.join().unwrap(),
    }
}

fn spinctl(args: &[&str]) -> Ran {
    run(env!("CARGO_BIN_EXE_spinctl"), args)
}

fn s(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// The tiny diffusers pipeline the parity tests use (with a VAE, latents `[1, 4, 8, 8]`).
fn tiny_model() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/tiny-a")
}

fn write_latents(path: &Path, name: &str, shape: Vec<usize>) {
    let len = shape.iter().product();
    let tensors = [(name.to_string(), (shape, vec![0.0f32; len]))]
        .into_iter()
        .collect();
    spin_worker::weights::write_safetensors(path, &tensors, None).unwrap();
}

#[test]
fn sample_with_a_missing_model_folder_names_it_and_writes_nothing() {
    let dir = Scratch::new("nomodel");
    let model = dir.join("no-such-model");
    let out = dir.join("out.png");
    spinctl(&[
        "sample",
        "--model",
        s(&model),
        "--prompt",
        "x",
        "--out",
        s(&out),
    ])
    .refused(&["no-such-model", "model_index.json"]);
    assert!(!out.exists());
}

#[test]
fn sample_with_latents_missing_their_tensor_names_key_and_file() {
    let dir = Scratch::new("nolatents");
    let latents = dir.join("noise.safetensors");
    write_latents(&latents, "noise", vec![1, 4, 8, 8]);
    let out = dir.join("out.png");
    spinctl(&[
        "sample",
        "--model",
        s(&tiny_model()),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--latents",
        s(&latents),
        "--out",
        s(&out),
    ])
    .refused(&["`latents`", "noise.safetensors", "missing"]);
    assert!(!out.exists());
}

#[test]
fn sample_with_empty_latents_is_refused() {
    let dir = Scratch::new("emptylatents");
    let latents = dir.join("empty.safetensors");
    write_latents(&latents, "latents", vec![1, 4, 0, 0]);
    let out = dir.join("out.png");
    spinctl(&[
        "sample",
        "--model",
        s(&tiny_model()),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--latents",
        s(&latents),
        "--out",
        s(&out),
    ])
    .refused(&["latents", "[1, 4, 0, 0]"]);
    assert!(!out.exists());
}

#[test]
fn sample_with_an_unknown_device_names_it() {
    let dir = Scratch::new("device");
    spinctl(&[
        "sample",
        "--model",
        s(&tiny_model()),
        "--prompt",
        "x",
        "--device",
        "tpu",
        "--out",
        s(&dir.join("out.png")),
    ])
    .refused(&["unknown device \"tpu\"", "flex"]);
}

#[test]
fn sample_into_a_missing_folder_is_refused_before_sampling() {
    let dir = Scratch::new("outdir");
    let out = dir.join("no-such-folder").join("out.png");
    let started = Instant::now();
    spinctl(&[
        "sample",
        "--model",
        s(&tiny_model()),
        "--prompt",
        "x",
        "--steps",
        "200",
        "--out",
        s(&out),
    ])
    .refused(&["--out", "no-such-folder", "does not exist"]);
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refused before 1000 steps"
    );
}

#[test]
fn sample_without_a_prompt_is_a_usage_error() {
    spinctl(&["sample", "--model", "m", "--out", "o.png"]).refused(&["--prompt"]);
}

const SPEC: &str = "[job]\nname = \"bad\"\noutput = \"out\"\n[model]\nbase = \"BASE\"\n\
    [data]\ntrain = [\"DATA\"]\nresolution = 32\n[sampling]\nsteps = 2\n\
    [training]\nbatch_size = 1\ngradient_accumulation = 1\n[[iteration]]\nlr = 1e-4\nsteps = 1\n";

fn write_spec(dir: &Path, base: &Path, data: &Path, extra: &str) -> PathBuf {
    let text = SPEC
        .replace("BASE", s(base))
        .replace("DATA", s(data))
        .replace("[[iteration]]", &format!("{extra}[[iteration]]"));
    let path = dir.join("job.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn train_with_a_missing_spec_file_names_it() {
    let dir = Scratch::new("nospec");
    spinctl(&["train", "--local", s(&dir.join("missing-job.toml"))]).refused(&["missing-job.toml"]);
}

#[test]
fn train_with_a_bad_spec_names_the_field_and_writes_nothing() {
    let dir = Scratch::new("badspec");
    let spec = write_spec(&dir, &dir.join("base"), &dir.join("data"), "");
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(
        &spec,
        text.replace("[training]", "[training]\nobjective = \"spinn\""),
    )
    .unwrap();
    spinctl(&["train", "--local", s(&spec)]).refused(&["spinn", "training.objective"]);
    assert!(!dir.join("out").exists(), "no output folder");
}

#[test]
fn train_with_missing_data_names_it_and_writes_nothing() {
    let dir = Scratch::new("nodata");
    let base = dir.join("base");
    spin_worker::toy_model::write_toy_pipeline(&base, &burn::tensor::Device::flex()).unwrap();
    let spec = write_spec(&dir, &base, &dir.join("no-such-data"), "");
    spinctl(&["train", "--local", s(&spec)]).refused(&["data.train", "no-such-data"]);
    assert!(!dir.join("out").exists(), "no output folder");
}

#[test]
fn train_with_a_missing_base_model_names_it_and_writes_nothing() {
    let dir = Scratch::new("nobase");
    let data = dir.join("data");
    spin_common::toy::write_toy_dataset(&data, 8, 1).unwrap();
    let spec = write_spec(&dir, &dir.join("no-such-base"), &data, "");
    spinctl(&["train", "--local", s(&spec)]).refused(&[
        "model.base",
        "no-such-base",
        "model_index.json",
    ]);
    assert!(!dir.join("out").exists(), "no output folder");
}

fn spin_worker(args: &[&str]) -> Ran {
    run(common::daemon_binary("spin-worker"), args)
}

#[test]
fn worker_with_a_bad_listen_address_names_the_flag() {
    spin_worker(&["--listen", "localhost:port"]).refused(&["--listen", "localhost:port"]);
}

#[test]
fn worker_with_an_unknown_device_names_it() {
    spin_worker(&["--device", "tpu", "--connect-timeout-s", "1"])
        .refused(&["unknown device \"tpu\""]);
}

#[test]
fn worker_with_an_unreachable_coordinator_names_the_url() {
    // A port that was free a moment ago: nothing listens there.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    drop(listener);
    spin_worker(&["--coordinator", &url, "--connect-timeout-s", "1"])
        .refused(&[&url, "cannot connect"]);
}

#[test]
fn coordinator_with_an_unknown_setting_names_it() {
    let dir = Scratch::new("coordconfig");
    let config = dir.join("coordinator.toml");
    std::fs::write(
        &config,
        "tick_interval_ms = 100\nheartbeat_timout_ms = 3000\n",
    )
    .unwrap();
    let ran = run(
        common::daemon_binary("spin-coordinator"),
        &[
            "--listen",
            "127.0.0.1:0",
            "--journal",
            s(&dir.join("journal.redb")),
            "--config",
            s(&config),
        ],
    );
    assert_eq!(ran.code, Some(2), "{ran:?}");
    assert!(!ran.stderr.contains("panicked at"), "{ran:?}");
    for thing in ["coordinator.toml", "heartbeat_timout_ms"] {
        assert!(ran.stderr.contains(thing), "{thing:?} not named: {ran:?}");
    }
    assert!(!dir.join("journal.redb").exists(), "no journal created");
}

#[test]
fn train_with_no_usable_prompts_leaves_no_output_folder() {
    // Every prompt held out: the run fails after it opened its output folder, which is
    // removed again because nothing was written in it.
    let dir = Scratch::new("noprompts");
    let base = dir.join("base");
    spin_worker::toy_model::write_toy_pipeline(&base, &burn::tensor::Device::flex()).unwrap();
    let data = dir.join("data");
    spin_common::toy::write_toy_dataset(&data, 4, 1).unwrap();
    let spec = write_spec(&dir, &base, &data, "");
    let text = std::fs::read_to_string(&spec).unwrap();
    std::fs::write(
        &spec,
        text.replace(
            "resolution = 32",
            "resolution = 32\nheld_out_fraction = 0.999",
        ),
    )
    .unwrap();
    spinctl(&["train", "--local", s(&spec)]).refused(&["no training prompts", "data.train"]);
    assert!(!dir.join("out").exists(), "no output folder");
}

#[test]
fn submit_with_a_missing_spec_file_names_it_before_connecting() {
    let dir = Scratch::new("submit");
    // No coordinator listens on port 1: the spec is read and refused before any connection.
    spinctl(&[
        "--coordinator",
        "http://127.0.0.1:1",
        "submit",
        s(&dir.join("missing-job.toml")),
    ])
    .refused(&["job spec", "missing-job.toml"]);
}
