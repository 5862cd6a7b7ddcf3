"""TransformerLens' ``transformer_lens.utils`` helpers, same names, arguments and outputs.

``from fxlens import utils`` then ``utils.get_act_name("k6")``, ``utils.to_numpy(x)``,
``utils.test_prompt(prompt, answer, model)``, ``utils.lm_cross_entropy_loss(logits, tokens)``,
``utils.tokenize_and_concatenate(dataset, tokenizer)``, ``utils.Slice``...
"""

from __future__ import annotations

import re
from typing import Any, Union

import numpy as np
import torch
import torch.nn.functional as F

from .names import act_name

__all__ = ["Slice", "SliceInput", "as_slice", "get_act_name", "get_corner", "get_device", "lm_accuracy",
           "lm_cross_entropy_loss", "remove_batch_dim", "test_prompt", "to_numpy",
           "tokenize_and_concatenate", "transpose"]

SliceInput = Union[None, int, tuple, list, slice, torch.Tensor, np.ndarray]


class Slice:
    """TransformerLens' ``Slice``: how analysis functions take ``pos_slice`` / ``batch_slice`` / ``neuron_slice``.

    ``None`` keeps everything; an int indexes (the dim goes away); a tuple is ``slice(*tuple)``
    (``(k,)`` is ``:k``, ``(a, b)`` is ``a:b``, ``(a, b, s)`` is ``a:b:s``); a ``slice`` is used as is;
    a list, tensor or array of indices selects those (the dim stays).
    """

    def __init__(self, input_slice: SliceInput = None):
        if isinstance(input_slice, (torch.Tensor, np.ndarray)) and input_slice.ndim == 0 \
                and not input_slice.dtype == torch.bool:
            input_slice = int(input_slice.item())
        if isinstance(input_slice, np.integer):
            input_slice = int(input_slice)
        if isinstance(input_slice, bool):
            raise ValueError(f"Invalid input_slice {input_slice}")
        if isinstance(input_slice, tuple):
            self.slice, self.mode = slice(*input_slice), "slice"
        elif isinstance(input_slice, int):
            self.slice, self.mode = input_slice, "int"
        elif isinstance(input_slice, slice):
            self.slice, self.mode = input_slice, "slice"
        elif isinstance(input_slice, (list, torch.Tensor, np.ndarray)):
            self.slice, self.mode = to_numpy(input_slice), "array"
        elif input_slice is None:
            self.slice, self.mode = slice(None), "identity"
        else:
            raise ValueError(f"Invalid input_slice {input_slice}")

    def apply(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """``tensor`` sliced along ``dim``."""
        index: list[Any] = [slice(None)] * tensor.ndim
        index[dim] = torch.as_tensor(self.slice, device=tensor.device) if self.mode == "array" else self.slice
        return tensor[tuple(index)]

    def indices(self, max_ctx: int | None = None) -> np.ndarray:
        """The indices this slice selects on an axis of size ``max_ctx`` (``[n]`` for an int)."""
        if self.mode == "int":
            return np.array([self.slice], dtype=np.int64)
        if max_ctx is None:
            raise ValueError("max_ctx must be specified if slice is not an integer")
        return np.arange(max_ctx, dtype=np.int64)[self.slice]

    @classmethod
    def unwrap(cls, slice_input: Slice | SliceInput) -> Slice:
        """A ``Slice`` of ``slice_input``; an int becomes ``[int]`` so that the dim stays."""
        if isinstance(slice_input, Slice):
            return slice_input
        if isinstance(slice_input, (int, np.integer)) and not isinstance(slice_input, bool):
            slice_input = [int(slice_input)]
        return cls(slice_input)

    def __repr__(self) -> str:
        return f"Slice: {self.slice} Mode: {self.mode} "


def as_slice(s: Slice | SliceInput) -> Slice:
    """``s`` as a :class:`Slice` (unchanged if it is one)."""
    return s if isinstance(s, Slice) else Slice(s)


def get_act_name(name: str, layer: int | str | None = None, layer_type: str | None = None) -> str:
    """Full hook name from TL shorthand: ``get_act_name("k", 6)``, ``get_act_name("k6")``,
    ``get_act_name("scale4ln1")``, ``get_act_name("attn", 2)`` (the pattern), ``get_act_name("value", 0)``.

    TransformerLens' rules exactly (a full name is returned as is), plus
    ``get_act_name("normalized", None, "ln_final")`` -> ``ln_final.hook_normalized``.
    """
    return act_name(name, layer, layer_type)


def to_numpy(tensor) -> np.ndarray:
    """A numpy array of a tensor (detached, on the CPU; bfloat16 upcast), list, tuple, array or scalar."""
    if isinstance(tensor, np.ndarray):
        return tensor
    if isinstance(tensor, (list, tuple)):
        return np.array(tensor)
    if isinstance(tensor, torch.Tensor):
        t = tensor.detach().cpu()
        return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
    if isinstance(tensor, (int, float, bool, str)):
        return np.array(tensor)
    raise ValueError(f"Input to to_numpy has invalid type: {type(tensor)}")


def get_device() -> str:
    """``"cuda"`` if available, else ``"cpu"`` (MPS only with ``TRANSFORMERLENS_ALLOW_MPS=1``, as TL)."""
    import os

    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available() and os.environ.get("TRANSFORMERLENS_ALLOW_MPS", "") == "1":
        return "mps"
    return "cpu"


def remove_batch_dim(tensor: torch.Tensor) -> torch.Tensor:
    """Drop a leading dim of size 1; other tensors are returned unchanged."""
    return tensor.squeeze(0) if tensor.ndim > 0 and tensor.shape[0] == 1 else tensor


def get_corner(tensor, n: int = 3):
    """The top-left ``n x n x ...`` corner of a tensor (or of a ``FactoredMatrix``)."""
    from .interventions.factored_matrix import FactoredMatrix

    if isinstance(tensor, FactoredMatrix):
        return tensor.get_corner(n)
    return tensor[tuple(slice(n) for _ in range(tensor.ndim))]


def transpose(tensor: torch.Tensor) -> torch.Tensor:
    """Swap the last two dims."""
    return tensor.transpose(-1, -2)


def lm_cross_entropy_loss(logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          per_token: bool = False) -> torch.Tensor:
    """Next-token cross-entropy (TL's): the mean over predicted tokens, or ``[batch, pos - 1]`` with ``per_token``.

    With ``attention_mask``, positions where the token or the next one is padding count as 0 and are
    left out of the mean.
    """
    log_probs = F.log_softmax(logits, dim=-1)
    predicted = log_probs[..., :-1, :].gather(dim=-1, index=tokens[..., 1:, None])[..., 0]
    if attention_mask is not None:
        if attention_mask.shape != tokens.shape:
            raise ValueError(f"attention_mask must have the same shape as tokens, got "
                             f"{tuple(attention_mask.shape)} and {tuple(tokens.shape)}")
        keep = torch.logical_and(attention_mask[:, :-1].bool(), attention_mask[:, 1:].bool())
        predicted = predicted.masked_fill(~keep, 0.0)
        n_tokens = keep.sum().item()
    else:
        n_tokens = predicted.numel()
    return -predicted if per_token else -predicted.sum() / n_tokens


def lm_accuracy(logits: torch.Tensor, tokens: torch.Tensor, per_token: bool = False) -> torch.Tensor:
    """Top-1 next-token accuracy: a scalar, or booleans ``[batch, pos - 1]`` with ``per_token``."""
    correct = logits.argmax(dim=-1)[:, :-1] == tokens[:, 1:]
    return correct if per_token else correct.sum() / correct.numel()


def _rprint(text: str) -> None:
    """Print with rich's markup when rich is installed (as TL), else with the ``[b]`` tags removed."""
    try:
        from rich import print as rprint
    except ImportError:
        print(re.sub(r"\[/?b\]", "", text))
    else:
        rprint(text)


def test_prompt(prompt: str, answer: str | list[str], model, prepend_space_to_answer: bool = True,
                print_details: bool = True, prepend_bos: bool | None = None, top_k: int = 10) -> None:
    """Print how the model ranks ``answer`` after ``prompt`` (rank, logit, probability) and its top-k tokens.

    TransformerLens' printout; several answers compare their first tokens, one answer may be several tokens.
    """
    answers = [answer] if isinstance(answer, str) else list(answer)
    n_answers = len(answers)
    multiple = n_answers > 1
    if prepend_space_to_answer:
        answers = [a if a.startswith(" ") else " " + a for a in answers]
    prompt_tokens = model.to_tokens(prompt, prepend_bos=prepend_bos)
    if multiple:
        answer_tokens = torch.cat([model.to_tokens(a, prepend_bos=False)[:, :1] for a in answers])
    else:
        answer_tokens = model.to_tokens(answers, prepend_bos=False)
    tokens = torch.cat((prompt_tokens.repeat(answer_tokens.shape[0], 1), answer_tokens), dim=1)
    prompt_str_tokens = model.to_str_tokens(prompt, prepend_bos=prepend_bos)
    answer_str_tokens_list = [model.to_str_tokens(a, prepend_bos=False) for a in answers]
    prompt_length = len(prompt_str_tokens)
    answer_length = 1 if multiple else len(answer_str_tokens_list[0])
    if print_details:
        print("Tokenized prompt:", prompt_str_tokens)
        if multiple:
            print("Tokenized answers:", answer_str_tokens_list)
        else:
            print("Tokenized answer:", answer_str_tokens_list[0])
    logits = model(tokens)
    probs = logits.softmax(dim=-1)
    answer_ranks: list[Any] = []
    for index in range(prompt_length, prompt_length + answer_length):
        ans = tokens[:, index]
        ans_str = [a[index - prompt_length] for a in answer_str_tokens_list]
        token_probs = probs[:, index - 1]
        sorted_probs, sorted_pos = token_probs.sort(descending=True)
        ranks = sorted_pos.argsort(-1)[range(n_answers), ans.cpu()].tolist()
        answer_ranks.append(list(zip(ans_str, ranks)))
        if print_details:
            _rprint(f"Performance on answer token{'s' if n_answers > 1 else ''}:\n" + "\n".join(
                f"[b]Rank: {ranks[i]: <8} Logit: {logits[i, index - 1, ans[i]].item():5.2f} "
                f"Prob: {token_probs[i, ans[i]].item():6.2%} Token: |{ans_str[i]}|[/b]" for i in range(n_answers)))
            for i in range(top_k):
                print(f"Top {i}th token. Logit: {logits[0, index - 1, sorted_pos[0, i]].item():5.2f} "
                      f"Prob: {sorted_probs[0, i].item():6.2%} Token: |{model.to_string(sorted_pos[0, i])}|")
    ranks_out = [r[0] for r in answer_ranks] if not multiple else answer_ranks
    _rprint(f"[b]Ranks of the answer tokens:[/b] {ranks_out}")


test_prompt.__test__ = False  # not a pytest test despite the name


def _token_rows(texts: list[str], tokenizer, max_length: int, add_bos_token: bool) -> np.ndarray:
    """TL's per-batch step: documents joined with EOS, cut into rows of ``max_length`` (BOS first)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenize_and_concatenate needs a tokenizer with an EOS token (it separates documents)")
    seq_len = max_length - 1 if add_bos_token else max_length
    if not texts:
        return np.zeros((0, max_length), dtype=np.int64)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    pieces: list[np.ndarray] = []
    for i, row in enumerate(encoded):
        pieces.append(np.asarray(row, dtype=np.int64))
        if i < len(encoded) - 1:
            pieces.append(np.array([tokenizer.eos_token_id], dtype=np.int64))
    tokens = np.concatenate(pieces)
    if len(tokens) < seq_len:
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        tokens = np.concatenate([tokens, np.full(seq_len - len(tokens), pad, dtype=np.int64)])
        n_rows = 1
    else:
        n_rows = len(tokens) // seq_len
        tokens = tokens[: seq_len * n_rows]
    rows = tokens.reshape(n_rows, seq_len)
    if add_bos_token:
        rows = np.concatenate([np.full((n_rows, 1), tokenizer.bos_token_id, dtype=np.int64), rows], axis=1)
    return rows


def tokenize_and_concatenate(dataset, tokenizer, streaming: bool = False, max_length: int = 1024,
                             column_name: str = "text", add_bos_token: bool = True, num_proc: int | None = 10,
                             set_format: bool = True):
    """Tokenise documents, join them with EOS and cut the stream into rows of ``max_length`` tokens.

    TransformerLens' function: a ``datasets.Dataset`` / ``IterableDataset`` gives a dataset with one
    ``"tokens"`` column (torch format with ``set_format``), batched as ``dataset.map`` batches it
    (1000 documents). Without ``datasets``, pass a list of strings (or of ``{column_name: text}``
    dicts): the result is a ``[n_rows, max_length]`` tensor, all documents processed as one batch.
    """
    if add_bos_token and tokenizer.bos_token_id is None:
        raise ValueError("add_bos_token=True needs a tokenizer with a BOS token; pass add_bos_token=False")
    if isinstance(dataset, (list, tuple)):
        texts = [d[column_name] if isinstance(d, dict) else d for d in dataset]
        return torch.from_numpy(_token_rows(texts, tokenizer, max_length, add_bos_token))
    if not hasattr(dataset, "map"):
        raise TypeError(f"dataset must be a datasets.Dataset / IterableDataset or a list of strings, not "
                        f"{type(dataset).__name__}")
    columns = getattr(dataset, "column_names", None) or []
    extra = [c for c in columns if c != column_name]
    if extra:
        dataset = dataset.remove_columns(extra)

    def tokenize_function(examples: dict) -> dict:
        return {"tokens": _token_rows(list(examples[column_name]), tokenizer, max_length, add_bos_token)}

    kwargs = {} if streaming or num_proc is None else {"num_proc": num_proc}
    out = dataset.map(tokenize_function, batched=True, remove_columns=[column_name], **kwargs)
    if set_format:
        out.set_format(type="torch", columns=["tokens"])
    return out

