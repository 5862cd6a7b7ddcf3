"""Text for lenses: plain-text files or folders -> fixed-length token chunks with their byte counts.

The default demo corpus is Jane Austen's six novels (Debian ``r-cran-janeaustenr``; ``make austen``
writes them to ``$FXLENS_AUSTEN`` or ``/work/data/austen``): train on five, evaluate on *Persuasion*.
Text sources accept ``austen:train`` / ``austen:eval`` for those splits.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")
AUSTEN_EVAL = ("persuasion",)
AUSTEN_INSTRUCTIONS = """\
The Jane Austen corpus is missing (expected {root}/<novel>.txt for {novels}).
Install it (root, Debian/Ubuntu), or run `make austen`:
    apt-get install -y r-cran-janeaustenr
    mkdir -p {root} && Rscript -e 'library(janeaustenr); for (n in c({quoted})) \\
        writeLines(get(n), file.path("{root}", paste0(n, ".txt")))'
or point FXLENS_AUSTEN at a folder that has them, or pass your own --text files."""


def austen_root() -> Path:
    """Where the Austen novels live: ``$FXLENS_AUSTEN`` or ``/work/data/austen``."""
    return Path(os.environ.get("FXLENS_AUSTEN", "/work/data/austen"))


def austen_files(split: str = "train", root: str | Path | None = None) -> list[Path]:
    """The Austen novels of ``split`` (``"train"``: five novels, ``"eval"``: *Persuasion*, ``"all"``).

    Raises ``FileNotFoundError`` with install instructions when the corpus is missing.
    """
    root = Path(root) if root is not None else austen_root()
    names = {"train": [n for n in AUSTEN_NOVELS if n not in AUSTEN_EVAL], "eval": list(AUSTEN_EVAL),
             "all": list(AUSTEN_NOVELS)}
    if split not in names:
        raise ValueError(f"unknown Austen split {split!r}; use train, eval or all")
    files = [root / f"{n}.txt" for n in names[split]]
    if not all(f.exists() for f in files):
        quoted = ", ".join(f'"{n}"' for n in AUSTEN_NOVELS)
        raise FileNotFoundError(AUSTEN_INSTRUCTIONS.format(root=root, novels=", ".join(AUSTEN_NOVELS),
                                                           quoted=quoted))
    return files


def text_files(sources: str | Path | list) -> list[Path]:
    """Expand files, folders (their ``*.txt`` files, sorted) and ``austen:<split>`` into a file list."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    out: list[Path] = []
    for s in sources:
        if str(s).startswith("austen:"):
            out += austen_files(str(s).split(":", 1)[1])
            continue
        p = Path(s)
        if p.is_dir():
            found = sorted(p.glob("*.txt"))
            if not found:
                raise FileNotFoundError(f"folder {p} has no .txt files")
            out += found
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"text source {p} does not exist (give .txt files, a folder, or austen:train)")
    if not out:
        raise ValueError("no text files given")
    return out


@dataclass
class TokenChunks:
    """Fixed-length token chunks of a corpus.

    Attributes:
        tokens: ``[n_chunks, seq_len]`` token ids (documents joined with the EOS token).
        target_bytes: ``[n_chunks]`` UTF-8 bytes of the text each chunk's targets
            (``tokens[:, 1:]``) decode to: the denominator of bits per byte.
        sources: the files the chunks came from.
    """

    tokens: torch.Tensor
    target_bytes: torch.Tensor
    sources: list[str]

    def __len__(self) -> int:
        return self.tokens.shape[0]

    @property
    def seq_len(self) -> int:
        return self.tokens.shape[1]

    def head(self, n: int | None) -> TokenChunks:
        """The first ``n`` chunks (all if ``n`` is None)."""
        if n is None:
            return self
        return TokenChunks(self.tokens[:n], self.target_bytes[:n], self.sources)


def tokenize_chunks(tokenizer, sources, seq_len: int = 512, max_chunks: int | None = None) -> TokenChunks:
    """Read ``sources`` (see :func:`text_files`), tokenise, and cut into ``seq_len``-token chunks.

    Documents are joined with the tokenizer's EOS token (when it has one); the tail shorter than
    ``seq_len`` is dropped. ``max_chunks`` keeps that many chunks evenly spaced over the text.
    """
    if tokenizer is None:
        raise ValueError("tokenising text needs the model's tokenizer; this model has none")
    if seq_len < 2:
        raise ValueError("seq_len must be at least 2")
    files = text_files(sources)
    ids: list[int] = []
    eos = getattr(tokenizer, "eos_token_id", None)
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{f} is not UTF-8 text ({e}); convert it, e.g. `iconv -f latin1 -t utf-8 {f}`, "
                             "or leave it out of --text") from e
        if ids and eos is not None:
            ids.append(eos)
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
    n = len(ids) // seq_len
    if n == 0:
        raise ValueError(f"{len(ids)} tokens in {[str(f) for f in files]}: fewer than one chunk of {seq_len}")
    tokens = torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)
    if max_chunks is not None and max_chunks < n:
        tokens = tokens[torch.linspace(0, n - 1, max_chunks).round().long()]
    texts = tokenizer.batch_decode(tokens[:, 1:].tolist())
    target_bytes = torch.tensor([len(t.encode("utf-8")) for t in texts], dtype=torch.long)
    return TokenChunks(tokens, target_bytes, [str(f) for f in files])
