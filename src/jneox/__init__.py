"""jneox: rinna's Japanese GPT-NeoX instruction model, from tokenizer to server, in plain PyTorch."""
from .chat import ChatSession, format_prompt, parse_answer
from .checkpoint import save
from .config import ModelConfig
from .errors import CheckpointError
from .generate import Completion, generate, stream
from .hub import OFFICIAL_MODEL
from .loading import load, load_model, load_tokenizer
from .model import GPTNeoX
from .sampling import SamplingParams
from .tokenizer import Tokenizer, train_tokenizer

__version__ = "0.1.0"
__all__ = [
    "ChatSession", "CheckpointError", "Completion", "GPTNeoX", "ModelConfig", "OFFICIAL_MODEL", "SamplingParams",
    "Tokenizer", "format_prompt", "generate", "load", "load_model", "load_tokenizer", "parse_answer", "save",
    "stream", "train_tokenizer",
]
