"""Interop: a Hugging Face folder whose tokenizer loads exactly in transformers (:mod:`.tokenizer_json`,
its files written by :mod:`jneox.hf_tokenizer`) and GGUF files for llama.cpp/Ollama (:mod:`.gguf`)."""
