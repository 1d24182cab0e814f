"""Interop: ``tokenizer.json`` for transformers/vLLM/TGI (:mod:`.tokenizer_json`) and GGUF files for
llama.cpp/Ollama (:mod:`.gguf`, imported on use: it reads checkpoints, which import this package)."""
from .tokenizer_json import build_tokenizer, export_hf, write_hf_tokenizer

__all__ = ["build_tokenizer", "export_hf", "write_hf_tokenizer"]
