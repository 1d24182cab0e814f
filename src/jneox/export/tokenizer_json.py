"""``jneox export --format hf``: a Hugging Face folder whose tokenizer loads exactly in transformers
(the files themselves: :mod:`jneox.hf_tokenizer`)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..files import staged_folder
from ..hf_tokenizer import write_hf_tokenizer
from ..hub import resolve
from ..tokenizer import TokenizerError


def export_hf(model_dir: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """A Hugging Face folder whose tokenizer loads exactly in transformers: ``model_dir``'s files plus
    ``tokenizer.json`` and an updated ``tokenizer_config.json``.

    With ``out`` omitted or equal to ``model_dir`` the two files are written in place (a rinna folder
    fixed with one command). Otherwise ``out`` must not exist yet: the files are copied (hard-linked
    where the file system allows) into a staging folder beside it (:func:`jneox.files.staged_folder`).
    """
    src = resolve(model_dir)
    if out is None or (Path(out).exists() and Path(out).resolve() == src.resolve()):
        write_hf_tokenizer(src)
        return src
    out = Path(out)
    if out.exists():
        raise TokenizerError(f"{out}: already exists; pass a new folder, or the model folder itself to update it in place")
    with staged_folder(out) as tmp:
        for f in sorted(src.iterdir()):
            if f.is_file() and not f.name.startswith("."):
                real = f.resolve()  # hub caches hold symlinks into blobs/
                try:
                    os.link(real, tmp / f.name)
                except OSError:
                    shutil.copyfile(real, tmp / f.name)
        write_hf_tokenizer(tmp)
    return out
