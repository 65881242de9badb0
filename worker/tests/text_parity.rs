//! Parity of the CLIP tokenizer and text encoder with transformers, on the fixtures made by
//! `scripts/make_fixtures.py`.

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use common::{assert_close, device, fixture, reference};
use spin_worker::text::{ClipTextModel, ClipTokenizer};

fn prompts(name: &str) -> Vec<String> {
    let text =
        std::fs::read_to_string(fixture(name).join("reference.json")).expect("reference.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("json");
    json["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| p.as_str().expect("string").to_string())
        .collect()
}

fn expected_ids(name: &str) -> Vec<Vec<u32>> {
    let ids = reference(name)
        .require("input_ids")
        .expect("input_ids")
        .clone();
    let len = ids.shape[1];
    ids.values
        .chunks(len)
        .map(|row| row.iter().map(|&v| v as u32).collect())
        .collect()
}

fn check_tokenizer(tokenizer: &ClipTokenizer, name: &str) {
    for (prompt, expected) in prompts(name).iter().zip(expected_ids(name)) {
        let ids = tokenizer.encode(prompt).expect("encode");
        assert_eq!(ids, expected, "token ids of {prompt:?}");
    }
}

#[test]
fn tokenizer_matches_transformers_from_tokenizer_json() {
    for name in ["tiny-a", "tiny-b"] {
        let tokenizer = ClipTokenizer::load(&fixture(name).join("tokenizer")).expect("tokenizer");
        check_tokenizer(&tokenizer, name);
    }
}

#[test]
fn tokenizer_matches_transformers_from_vocab_and_merges() {
    // Only the slow tokenizer's files: the BPE pipeline is built here, not read from JSON.
    let dir = std::env::temp_dir().join(format!("spin-tokenizer-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    for file in ["vocab.json", "merges.txt", "tokenizer_config.json"] {
        std::fs::copy(
            fixture("tiny-a").join("tokenizer").join(file),
            dir.join(file),
        )
        .expect("copy");
    }
    let tokenizer = ClipTokenizer::load(&dir).expect("tokenizer");
    check_tokenizer(&tokenizer, "tiny-a");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn missing_tokenizer_files_are_named() {
    let dir = std::env::temp_dir().join(format!("spin-tokenizer-empty-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let err = ClipTokenizer::load(&dir).expect_err("no files").to_string();
    assert!(err.contains("vocab.json"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn text_encoder_matches_transformers() {
    let device = device();
    for name in ["tiny-a", "tiny-b"] {
        let reference = reference(name);
        let (model, _) =
            ClipTextModel::load(&fixture(name).join("text_encoder"), &device).expect("load");
        let ids = reference.require("input_ids").expect("ids");
        let values: Vec<i64> = ids.values.iter().map(|&v| v as i64).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(values, ids.shape.clone()), &device);
        let hidden = model.forward(ids);
        let expected = reference.require("text_hidden").expect("text_hidden");
        assert_close(hidden, expected, 1e-4, &format!("{name} text encoder"));
    }
}
