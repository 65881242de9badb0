//! transformers' `CLIPTextModel`: token + position embeddings, pre-LN encoder layers with a
//! causal mask, final layer norm. Its last hidden state conditions the UNet.

use std::path::Path;

use burn::module::Module;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{activation, Device, Int, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::ModelError;
use crate::nn::{Embedding, LayerNorm, Linear};
use crate::weights::{load_module, WeightFile};

/// The activation of the MLP, as `hidden_act` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// `x * sigmoid(1.702 x)`, CLIP's own.
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
}

/// `text_encoder/config.json`, the fields the model uses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    /// Token vocabulary size.
    pub vocab_size: usize,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Longest sequence (77).
    pub max_position_embeddings: usize,
    /// MLP activation.
    pub hidden_act: HiddenAct,
    /// Layer norm epsilon.
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
}

fn default_layer_norm_eps() -> f64 {
    1e-5
}

impl Default for ClipTextConfig {
    /// The SD-1.5 text encoder (openai/clip-vit-large-patch14).
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipTextConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return Err(ModelError::unsupported(
                path,
                "num_attention_heads",
                config.num_attention_heads,
            ));
        }
        Ok(config)
    }
}

/// `text_model.embeddings`.
#[derive(Module, Debug)]
pub struct ClipTextEmbeddings {
    token_embedding: Embedding,
    position_embedding: Embedding,
}

/// `self_attn` of an encoder layer.
#[derive(Module, Debug)]
pub struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    #[module(skip)]
    heads: usize,
}

impl ClipAttention {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let [n, l, d] = x.dims();
        let split = |t: Tensor<3>| {
            t.reshape([n, l, self.heads, d / self.heads])
                .swap_dims(1, 2)
        };
        let q = split(self.q_proj.forward(x.clone()));
        let k = split(self.k_proj.forward(x.clone()));
        let v = split(self.v_proj.forward(x));
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        let out = attention(q, k, v, None, None, options)
            .swap_dims(1, 2)
            .reshape([n, l, d]);
        self.out_proj.forward(out)
    }
}

/// `mlp` of an encoder layer.
#[derive(Module, Debug)]
pub struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    #[module(skip)]
    act: HiddenAct,
}

impl ClipMlp {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.fc1.forward(x);
        let h = match self.act {
            HiddenAct::QuickGelu => h.clone() * activation::sigmoid(h * 1.702),
            HiddenAct::Gelu => activation::gelu(h),
        };
        self.fc2.forward(h)
    }
}

/// One pre-LN transformer layer.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    mlp: ClipMlp,
    layer_norm2: LayerNorm,
}

impl ClipEncoderLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

/// `text_model.encoder`.
#[derive(Module, Debug)]
pub struct ClipEncoder {
    layers: Vec<ClipEncoderLayer>,
}

/// `text_model`.
#[derive(Module, Debug)]
pub struct ClipTextTransformer {
    embeddings: ClipTextEmbeddings,
    encoder: ClipEncoder,
    final_layer_norm: LayerNorm,
}

/// `CLIPTextModel`; parameter paths are transformers' keys (`text_model.encoder.layers.0...`).
#[derive(Module, Debug)]
pub struct ClipTextModel {
    text_model: ClipTextTransformer,
}

impl ClipTextModel {
    /// A model shaped by `config`, parameters not yet loaded.
    pub fn new(config: &ClipTextConfig, device: &Device) -> Self {
        let d = config.hidden_size;
        let eps = config.layer_norm_eps;
        let layer = || ClipEncoderLayer {
            self_attn: ClipAttention {
                q_proj: Linear::new(d, d, true, device),
                k_proj: Linear::new(d, d, true, device),
                v_proj: Linear::new(d, d, true, device),
                out_proj: Linear::new(d, d, true, device),
                heads: config.num_attention_heads,
            },
            layer_norm1: LayerNorm::new(d, eps, device),
            mlp: ClipMlp {
                fc1: Linear::new(d, config.intermediate_size, true, device),
                fc2: Linear::new(config.intermediate_size, d, true, device),
                act: config.hidden_act,
            },
            layer_norm2: LayerNorm::new(d, eps, device),
        };
        Self {
            text_model: ClipTextTransformer {
                embeddings: ClipTextEmbeddings {
                    token_embedding: Embedding::new(config.vocab_size, d, device),
                    position_embedding: Embedding::new(config.max_position_embeddings, d, device),
                },
                encoder: ClipEncoder {
                    layers: (0..config.num_hidden_layers).map(|_| layer()).collect(),
                },
                final_layer_norm: LayerNorm::new(d, eps, device),
            },
        }
    }

    /// Loads `dir/config.json` and `dir/model.safetensors` (a `text_encoder/` folder).
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, ClipTextConfig), ModelError> {
        let config = ClipTextConfig::from_file(&dir.join("config.json"))?;
        let file = WeightFile::open(&dir.join("model.safetensors"))?;
        let model = load_module(Self::new(&config, device), &file, "", device)?;
        Ok((model, config))
    }

    /// Token ids `[N, L]` -> last hidden state `[N, L, hidden]`.
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let [_, l] = ids.dims();
        let tm = &self.text_model;
        let positions = Tensor::<1, Int>::arange(0..l as i64, &ids.device()).unsqueeze::<2>();
        let mut x = tm.embeddings.token_embedding.forward(ids)
            + tm.embeddings.position_embedding.forward(positions);
        for layer in &tm.encoder.layers {
            x = layer.forward(x);
        }
        tm.final_layer_norm.forward(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_names_follow_transformers() {
        let config = ClipTextConfig {
            num_hidden_layers: 1,
            ..ClipTextConfig::default()
        };
        let model = ClipTextModel::new(&config, &Device::flex());
        let keys: Vec<String> = crate::weights::named_shapes(&model)
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert!(keys.contains(&"text_model.embeddings.token_embedding.weight".to_string()));
        assert!(keys.contains(&"text_model.encoder.layers.0.self_attn.q_proj.weight".to_string()));
        assert!(keys.contains(&"text_model.encoder.layers.0.mlp.fc2.bias".to_string()));
        assert!(keys.contains(&"text_model.final_layer_norm.weight".to_string()));
        assert_eq!(keys.len(), 2 + 16 + 2);
    }

    #[test]
    fn bad_head_count_names_the_option() {
        let dir = std::env::temp_dir().join(format!("clip-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let path = dir.join("config.json");
        let mut config = serde_json::to_value(ClipTextConfig::default()).expect("json");
        config["num_attention_heads"] = 5.into();
        std::fs::write(&path, config.to_string()).expect("write");
        let err = ClipTextConfig::from_file(&path)
            .expect_err("must fail")
            .to_string();
        assert!(
            err.contains("num_attention_heads") && err.contains("config.json"),
            "{err}"
        );
    }
}
