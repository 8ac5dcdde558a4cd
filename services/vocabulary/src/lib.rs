//! A GGUF model through llama.cpp, and what the worker and the shard's engines read from it:
//! the vocabulary (tokenize, detokenize) and the chat format. A model's tokenizer belongs to the
//! model, not to an engine: the worker renders prompts with [`ChatVocabulary`] (a
//! vocabulary-only load, a few ms and a few MB), the llama engine loads the same file with its
//! weights, and the openai engine turns ids into the text an engine server takes, so the token
//! ids a session caches are the ids the model consumes.

use std::num::NonZeroU16;
use std::path::Path;
use std::sync::OnceLock;

use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;

/// Why a model or its vocabulary could not be used.
#[derive(Debug, thiserror::Error)]
pub enum VocabularyError {
    #[error("model file {0} not found (scripts/fetch-model.sh fetches it)")]
    NotFound(String),
    #[error("llama.cpp backend: {0}")]
    Backend(String),
    #[error("loading {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("chat template: {0}")]
    ChatTemplate(String),
}

/// llama.cpp's backend is process-wide state: `llama_backend_init` may run once per process
/// and `LlamaBackend::init` refuses a second call. Shards and workers that share a process
/// (`tether dev`, the in-process tests) therefore share this one, which is never freed.
static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();

/// Returns the process's llama.cpp backend, initializing it (and routing llama.cpp's logs into
/// `tracing`, target `llama-cpp-2`) on first use.
pub fn backend() -> Result<&'static LlamaBackend, VocabularyError> {
    BACKEND
        .get_or_init(|| {
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|error| error.to_string())
        })
        .as_ref()
        .map_err(|error| VocabularyError::Backend(error.clone()))
}

/// Loads the model at `path` (weights too unless `vocab_only`).
pub fn load(path: &Path, vocab_only: bool) -> Result<LlamaModel, VocabularyError> {
    if !path.is_file() {
        return Err(VocabularyError::NotFound(path.display().to_string()));
    }
    let params = LlamaModelParams::default().with_vocab_only(vocab_only);
    LlamaModel::load_from_file(backend()?, path, &params)
        .map_err(|error| VocabularyError::Load { path: path.display().to_string(), reason: error.to_string() })
}

/// The chat format of a model: ChatML (`<|im_start|>{role}\n{content}<|im_end|>\n`), the format
/// tether's renderer writes, plus the system prompt the model's template adds when a
/// conversation has none (SmolLM2's: "You are a helpful AI assistant named SmolLM, ...").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatFormat {
    pub default_system: Option<String>,
}

impl ChatFormat {
    /// Reads the format from the model's own chat template (`tokenizer.chat_template`).
    /// Only ChatML templates are supported.
    pub fn of(model: &LlamaModel) -> Result<ChatFormat, VocabularyError> {
        let template = model.chat_template(None).map_err(|error| {
            VocabularyError::ChatTemplate(format!("the model has no usable chat template: {error}"))
        })?;
        let template = template.to_string().map_err(|error| VocabularyError::ChatTemplate(error.to_string()))?;
        ChatFormat::parse(&template)
    }

    /// Parses a Jinja chat template far enough to check that it is ChatML and to find its
    /// default system prompt.
    pub fn parse(template: &str) -> Result<ChatFormat, VocabularyError> {
        if !template.contains("<|im_start|>") || !template.contains("<|im_end|>") {
            return Err(VocabularyError::ChatTemplate("the model's chat template is not ChatML (unsupported)".into()));
        }
        const OPEN: &str = "<|im_start|>system\n";
        let default_system = template.find(OPEN).and_then(|start| {
            let rest = &template[start + OPEN.len()..];
            let text = &rest[..rest.find("<|im_end|>")?];
            // A literal, not a template expression that inserts the conversation's own message.
            (!text.contains("{{") && !text.contains("{%") && !text.contains('\'') && !text.trim().is_empty())
                .then(|| text.to_owned())
        });
        Ok(ChatFormat { default_system })
    }
}

/// A model's vocabulary and chat format, loaded without weights.
pub struct ChatVocabulary {
    model: LlamaModel,
    format: ChatFormat,
}

impl ChatVocabulary {
    /// Loads the vocabulary and chat format of the GGUF model at `path`.
    pub fn load(path: &Path) -> Result<ChatVocabulary, VocabularyError> {
        let model = load(path, true)?;
        let format = ChatFormat::of(&model)?;
        Ok(ChatVocabulary { model, format })
    }

    pub fn format(&self) -> &ChatFormat {
        &self.format
    }

    /// Tokenizes `text`. With `markup`, special-token text (`<|im_start|>`) becomes the special
    /// token; without it, it stays ordinary text, so user content cannot forge turn markers.
    pub fn encode(&self, text: &str, markup: bool) -> Vec<u32> {
        tokenize(&self.model, text, markup)
    }

    /// Detokenizes `ids` (special tokens rendered as their text).
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            piece_bytes(&self.model, id, &mut bytes);
        }
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// Tokenizes without adding BOS (the chat template decides every token).
pub fn tokenize(model: &LlamaModel, text: &str, parse_special: bool) -> Vec<u32> {
    if text.is_empty() {
        return Vec::new();
    }
    model.vocab().tokenize(text.as_bytes(), false, parse_special).into_iter().map(|token| token.0 as u32).collect()
}

/// Appends the bytes of token `id` (special tokens as their text).
pub fn piece_bytes(model: &LlamaModel, id: u32, out: &mut Vec<u8>) {
    model.vocab().token_to_piece_into(LlamaToken(id as i32), out, true, None::<NonZeroU16>);
}

/// Turns a stream of token bytes into UTF-8 text: a character split across tokens is held
/// until its last byte arrives.
#[derive(Default)]
pub struct Utf8Stream {
    pending: Vec<u8>,
}

impl Utf8Stream {
    /// Adds `bytes` and returns the text that is complete.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            // An invalid sequence (not just an unfinished one) is passed on lossily.
            Err(error) if error.error_len().is_some() => self.pending.len(),
            Err(error) => error.valid_up_to(),
        };
        let ready: Vec<u8> = self.pending.drain(..valid).collect();
        String::from_utf8_lossy(&ready).into_owned()
    }

    /// Returns what is left (lossily: an unfinished character at the very end).
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::{ChatFormat, Utf8Stream};

    const SMOLLM2: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn chat_format_finds_the_default_system_prompt() {
        let format = ChatFormat::parse(SMOLLM2).expect("chatml");
        assert_eq!(
            format.default_system.as_deref(),
            Some("You are a helpful AI assistant named SmolLM, trained by Hugging Face")
        );
        let plain =
            "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}{% endfor %}";
        assert_eq!(ChatFormat::parse(plain).expect("chatml").default_system, None);
        assert!(ChatFormat::parse("[INST] {{ m }} [/INST]").is_err());
    }

    #[test]
    fn utf8_stream_holds_split_characters() {
        let mut stream = Utf8Stream::default();
        let bytes = "é!".as_bytes();
        assert_eq!(stream.push(&bytes[..1]), "");
        assert_eq!(stream.push(&bytes[1..]), "é!");
        assert_eq!(stream.push(&[0xe2, 0x82]), "");
        assert_eq!(stream.finish(), "\u{fffd}");
    }
}
