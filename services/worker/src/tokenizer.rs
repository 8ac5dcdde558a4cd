//! The tokenizers the worker renders prompts with: o200k_base for the sim model, and a llama
//! model's own vocabulary for models a llama shard serves (`--llama-model NAME=PATH`), so the
//! token ids the worker caches and sends are the ids that shard consumes.

#[cfg(feature = "llama")]
mod llama;
mod memo;

pub use self::memo::Memoized;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use tether_common::tokenizer::{self, CoreBPE};

use crate::error::WorkerError;
use crate::render::Renderer;

/// Turns text into a model's token ids.
pub trait Tokenizer: Send + Sync {
    /// Tokenizes content: text that looks like a special token stays ordinary text.
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Tokenizes chat-template markup (`<|im_start|>user\n`), special tokens included.
    fn encode_markup(&self, text: &str) -> Vec<u32>;
    /// The system prompt the model's template uses when a conversation has none.
    fn default_system(&self) -> Option<&str> {
        None
    }
    /// Tells vocabularies apart in the header key: a chain that changes model is rendered again.
    fn key(&self) -> u64;
}

/// OpenAI's o200k_base, the sim model's tokenizer. Its chat markup is ordinary text.
pub struct O200k(Arc<CoreBPE>);

impl O200k {
    pub fn new() -> Self {
        O200k(tokenizer::o200k())
    }
}

impl Default for O200k {
    fn default() -> Self {
        Self::new()
    }
}

impl Tokenizer for O200k {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.0.encode_ordinary(text)
    }

    fn encode_markup(&self, text: &str) -> Vec<u32> {
        self.0.encode_ordinary(text)
    }

    fn key(&self) -> u64 {
        0
    }
}

/// A renderer per model: the model's own vocabulary for llama models, o200k for the rest.
#[derive(Default)]
pub struct Renderers {
    default: Renderer,
    by_model: HashMap<String, Renderer>,
}

impl Renderers {
    /// Loads the vocabulary and chat format of each `(model name, GGUF path)`.
    pub fn load(llama_models: &[(String, PathBuf)]) -> Result<Renderers, WorkerError> {
        let mut renderers = Renderers::default();
        for (name, path) in llama_models {
            let tokenizer = load_llama(path)?;
            tracing::info!(model = %name, path = %path.display(), "rendering with the model's vocabulary");
            renderers.by_model.insert(name.clone(), Renderer::with_tokenizer(tokenizer));
        }
        Ok(renderers)
    }

    /// The renderer for `model`.
    pub fn for_model(&self, model: &str) -> &Renderer {
        self.by_model.get(model).unwrap_or(&self.default)
    }
}

#[cfg(feature = "llama")]
fn load_llama(path: &std::path::Path) -> Result<Arc<dyn Tokenizer>, WorkerError> {
    llama::LlamaTokenizer::load(path).map(|t| Arc::new(t) as Arc<dyn Tokenizer>)
}

#[cfg(not(feature = "llama"))]
fn load_llama(path: &std::path::Path) -> Result<Arc<dyn Tokenizer>, WorkerError> {
    Err(WorkerError::Io(std::io::Error::other(format!(
        "--llama-model {}: this build has no llama support; rebuild with `--features llama`",
        path.display()
    ))))
}
