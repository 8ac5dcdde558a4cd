//! The served model's vocabulary, as the openai engine needs it: token ids to prompt text (for
//! an engine that takes only text prompts) and the engine's streamed text to token ids (the
//! worker caches a session's ids and sends them back next turn).
//!
//! It must be the model's own: the GGUF vocabulary the worker renders with
//! (`--llama-model NAME=PATH` on the worker, `--openai-vocabulary PATH` on the shard), loaded
//! without weights through llama.cpp (the `llama` cargo feature).

use std::path::Path;
use std::sync::Arc;

use crate::error::ShardError;

/// Token ids to text and back, in one model's vocabulary.
pub trait Vocabulary: Send + Sync {
    /// Tokenizes generated text (special-token text stays ordinary text).
    fn encode(&self, text: &str) -> Vec<u32>;
    /// Detokenizes a prompt, special tokens as their text (`<|im_start|>`), which the engine's
    /// tokenizer turns back into the special tokens.
    fn decode(&self, ids: &[u32]) -> String;
}

/// Loads the vocabulary of the GGUF model at `path` (a few ms; call it off the runtime).
#[cfg(feature = "llama")]
pub fn load(path: &Path) -> Result<Arc<dyn Vocabulary>, ShardError> {
    use tether_vocabulary::ChatVocabulary;

    struct Gguf(ChatVocabulary);

    impl Vocabulary for Gguf {
        fn encode(&self, text: &str) -> Vec<u32> {
            self.0.encode(text, false)
        }

        fn decode(&self, ids: &[u32]) -> String {
            self.0.decode(ids)
        }
    }

    Ok(Arc::new(Gguf(ChatVocabulary::load(path)?)))
}

/// Without the `llama` feature there is no GGUF loader.
#[cfg(not(feature = "llama"))]
pub fn load(path: &Path) -> Result<Arc<dyn Vocabulary>, ShardError> {
    Err(ShardError::Engine(format!(
        "--openai-vocabulary {}: this build has no GGUF vocabulary loader; rebuild with `--features llama`",
        path.display()
    )))
}
