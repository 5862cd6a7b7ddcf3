"""Tokenizer helpers with TransformerLens names and keywords (mixed into ``HookedModel``).

BOS: ``prepend_bos=None`` means ``self.default_prepend_bos``, and when that is ``None`` too, the
tokenizer's own behaviour (whatever ``tokenizer(text)`` gives). ``fxlens.from_pretrained`` /
``fxlens.trace`` leave ``default_prepend_bos`` at ``None``; TransformerLens (and fxlens'
``HookedTransformer`` entry point) default to ``True``, so a TL port that loads with the plain
entry point may see positions shifted by one: set ``model.default_prepend_bos = True`` or pass
``prepend_bos=True``. ``True`` adds the BOS id when the tokenizer does not, ``False`` removes the
one it adds (TransformerLens' rule; other special tokens are kept).
"""

from __future__ import annotations

import numpy as np
import torch


def _ids_of(tokens) -> torch.Tensor:
    """Ints, lists, numpy arrays or tensors as a ``torch.long`` tensor (on the CPU if not a tensor)."""
    return tokens if isinstance(tokens, torch.Tensor) else torch.as_tensor(np.asarray(tokens), dtype=torch.long)


class TokenMixin:
    """``to_tokens``, ``to_str_tokens``, ``to_string``, ``to_single_token``, ``to_single_str_token``,
    ``get_token_position`` with TransformerLens' arguments and defaults (see the module docstring for BOS)."""

    tokenizer = None
    device: torch.device
    #: ``prepend_bos`` when a call passes ``None``; ``None`` here keeps the tokenizer's own behaviour.
    default_prepend_bos: bool | None = None
    #: ``padding_side`` when a call passes ``None``; ``None`` here uses ``tokenizer.padding_side``.
    default_padding_side: str | None = None

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass tokenizer= to fxlens.trace, or give token ids")
        return self.tokenizer

    def _tokenizer_prepends_bos(self) -> bool:
        tok = self._tok()
        if tok.bos_token_id is None:
            return False
        ids = tok("")["input_ids"]
        return bool(ids) and ids[0] == tok.bos_token_id

    def _row(self, text: str, prepend_bos: bool | None) -> list[int]:
        tok = self._tok()
        ids = list(tok(text)["input_ids"])
        want = self.default_prepend_bos if prepend_bos is None else prepend_bos
        if want is None or tok.bos_token_id is None:
            return ids
        prepends = self._tokenizer_prepends_bos()
        if want and not prepends:
            return [tok.bos_token_id, *ids]
        if not want and prepends and ids and ids[0] == tok.bos_token_id:
            return ids[1:]
        return ids

    def _tokenize(self, text: str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None,
                  truncate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, attention_mask)`` on the CPU, both ``[batch, pos]``; keeps no state (safe across threads).

        ``truncate`` cuts rows to ``cfg.n_ctx`` (on the tokenizer's ``truncation_side``).
        """
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("give a string or a non-empty list of strings to tokenise")
        tok = self._tok()
        rows = [self._row(t, prepend_bos) for t in texts]
        if any(len(r) == 0 for r in rows):
            raise ValueError(f"empty input: {texts!r} tokenises to zero tokens")
        n_ctx = getattr(getattr(self, "cfg", None), "n_ctx", None)
        if truncate and n_ctx:
            left = getattr(tok, "truncation_side", "right") == "left"
            rows = [r[-n_ctx:] if left else r[:n_ctx] for r in rows]
        width = max(map(len, rows))
        side = padding_side or self.default_padding_side or getattr(tok, "padding_side", "right")
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', not {side!r}")
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r)
            mask[i, sl] = 1
        return ids, mask

    def to_tokens(self, input: str | list[str], prepend_bos: bool | None = None, padding_side: str | None = None,
                  move_to_device: bool = True, truncate: bool = True) -> torch.Tensor:
        """Token ids ``[batch, pos]`` (TransformerLens' ``to_tokens``); lists are padded on ``padding_side``.

        ``truncate`` (default, as TL) cuts rows longer than ``cfg.n_ctx``; ``move_to_device=False``
        leaves the ids on the CPU.
        """
        ids, _ = self._tokenize(input, prepend_bos, padding_side, truncate)
        return ids.to(self.device) if move_to_device else ids

    def to_tokens_and_mask(self, text: str | list[str], prepend_bos: bool | None = None,
                           padding_side: str | None = None, truncate: bool = False
                           ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, attention_mask)`` on the model's device, both ``[batch, pos]`` (the mask is 0 at padding)."""
        ids, mask = self._tokenize(text, prepend_bos, padding_side, truncate)
        return ids.to(self.device), mask.to(self.device)

    def to_string(self, tokens) -> str | list[str]:
        """Decode ids (an int, a list, a numpy array or a tensor); a 2-D input gives one string per row."""
        ids = _ids_of(tokens)
        if ids.dim() == 2:
            return [self._tok().decode(r.tolist(), clean_up_tokenization_spaces=False) for r in ids]
        if ids.dim() > 2:
            raise ValueError(f"to_string takes ids of shape [pos] or [batch, pos], not {tuple(ids.shape)}")
        return self._tok().decode(ids.reshape(-1).tolist(), clean_up_tokenization_spaces=False)

    def to_str_tokens(self, input, prepend_bos: bool | None = None,
                      padding_side: str | None = None) -> list[str] | list[list[str]]:
        """Each token of ``input`` as its own string; a list of inputs gives a list of lists (as TL).

        ``input``: a string (tokenised with ``prepend_bos``, truncated to ``n_ctx``), or ids of shape
        ``[pos]`` / ``[1, pos]`` (tensor or numpy array).
        """
        if isinstance(input, list):
            return [self.to_str_tokens(x, prepend_bos, padding_side) for x in input]
        if isinstance(input, str):
            ids = self.to_tokens(input, prepend_bos, padding_side, move_to_device=False)[0]
        elif isinstance(input, (torch.Tensor, np.ndarray)):
            ids = _ids_of(input).squeeze()
            if ids.dim() > 1:
                raise ValueError(f"to_str_tokens takes one sequence, shape [pos] or [1, pos], not "
                                 f"{tuple(input.shape)}: index the batch first, or pass a list of sequences")
        else:
            raise ValueError(f"to_str_tokens takes a string, a list, a tensor or a numpy array, not "
                             f"{type(input).__name__}")
        return self._tok().batch_decode([[int(t)] for t in ids.reshape(-1).tolist()],
                                        clean_up_tokenization_spaces=False)

    def to_single_token(self, string: str) -> int:
        """The id of ``string`` (tokenised without BOS); raises if it is not exactly one token."""
        ids = self._tokenize(string, prepend_bos=False)[0][0]
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens, not one: {ids.tolist()}")
        return int(ids[0])

    def to_single_str_token(self, int_token: int) -> str:
        """The string of the single token ``int_token``."""
        if isinstance(int_token, torch.Tensor) and int_token.numel() == 1:
            int_token = int(int_token)
        if not isinstance(int_token, int):
            raise TypeError(f"to_single_str_token takes an int token id, not {type(int_token).__name__}")
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    def get_token_position(self, single_token: str | int | torch.Tensor, input, mode: str = "first",
                           prepend_bos: bool | None = None, padding_side: str | None = None) -> int:
        """Position of ``single_token`` in ``input`` (a string, or ids ``[pos]`` / ``[1, pos]``);
        ``mode`` ``"first"`` or ``"last"``. ``prepend_bos`` applies to string input only."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', not {mode!r}")
        if isinstance(single_token, str):
            tid = self.to_single_token(single_token)
        else:
            tid = int(single_token)
        ids = self.to_tokens(input, prepend_bos, padding_side) if isinstance(input, str) else _ids_of(input)
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"get_token_position takes one sequence, shape [pos] or [1, pos], not "
                                 f"{tuple(ids.shape)}")
            ids = ids[0]
        hits = (ids == tid).nonzero().flatten().tolist()
        if not hits:
            raise ValueError(f"token {tid} ({self.to_string([tid])!r}) does not occur in the input")
        return hits[0] if mode == "first" else hits[-1]
