//! A GGUF model's vocabulary (loaded from its file without weights) through `tether-vocabulary`,
//! which also owns the process-wide llama.cpp backend. Whatever engine serves the model (llama
//! linked in, or an OpenAI-compatible server behind an openai shard) reads the same file.

use std::path::Path;

use tether_common::tokens::Fnv64;
use tether_vocabulary::ChatVocabulary;

use super::Tokenizer;
use crate::error::WorkerError;

pub struct LlamaTokenizer {
    vocabulary: ChatVocabulary,
    key: u64,
}

impl LlamaTokenizer {
    pub fn load(path: &Path) -> Result<LlamaTokenizer, WorkerError> {
        let vocabulary =
            ChatVocabulary::load(path).map_err(|error| WorkerError::Io(std::io::Error::other(error.to_string())))?;
        // Identify the vocabulary by what it does, not by its path.
        let mut hash = Fnv64::new();
        for probe in ["<|im_start|>user\n", "tether vocabulary probe: ünïcødé 12345"] {
            for id in vocabulary.encode(probe, true) {
                hash.write(&id.to_le_bytes());
            }
        }
        Ok(LlamaTokenizer { key: hash.finish() | 1, vocabulary })
    }
}

impl Tokenizer for LlamaTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        self.vocabulary.encode(text, false)
    }

    fn encode_markup(&self, text: &str) -> Vec<u32> {
        self.vocabulary.encode(text, true)
    }

    fn default_system(&self) -> Option<&str> {
        self.vocabulary.format().default_system.as_deref()
    }

    fn key(&self) -> u64 {
        self.key
    }
}
