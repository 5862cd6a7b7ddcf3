"""Tokenizer helpers with TransformerLens names (mixed into ``HookedModel``)."""

from __future__ import annotations

import torch


class TokenMixin:
    """``to_tokens``, ``to_str_tokens``, ``to_string``, ``to_single_token``, ``get_token_position``."""

    tokenizer = None
    device: torch.device

    def _tok(self):
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: pass tokenizer= to fxlens.trace, or give token ids")
        return self.tokenizer

    def _bos(self, prepend_bos: bool | None, ids: list[int]) -> list[int]:
        tok = self._tok()
        if prepend_bos and tok.bos_token_id is not None and (not ids or ids[0] != tok.bos_token_id):
            return [tok.bos_token_id, *ids]
        return ids

    def to_tokens(self, text: str | list[str], prepend_bos: bool | None = None,
                  padding_side: str | None = None) -> torch.Tensor:
        """Token ids ``[batch, pos]``; lists are padded (``padding_side``, default the tokenizer's).

        ``prepend_bos=None`` keeps the tokenizer's own special-token behaviour.
        """
        return self.to_tokens_and_mask(text, prepend_bos, padding_side)[0]

    def to_tokens_and_mask(self, text: str | list[str], prepend_bos: bool | None = None,
                           padding_side: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, attention_mask)``, both ``[batch, pos]`` (the mask is 0 at padding)."""
        texts = [text] if isinstance(text, str) else list(text)
        if not texts:
            raise ValueError("empty input: give at least one string")
        tok = self._tok()
        rows = [self._bos(prepend_bos, tok(t, add_special_tokens=prepend_bos is not False)["input_ids"])
                for t in texts]
        if any(len(r) == 0 for r in rows):
            raise ValueError(f"empty input: {texts!r} tokenises to zero tokens")
        width = max(map(len, rows))
        side = padding_side or getattr(tok, "padding_side", "right")
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
            ids[i, sl] = torch.tensor(r)
            mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    def to_string(self, tokens: torch.Tensor | list[int]) -> str | list[str]:
        """Decode ids; a 2-D tensor gives one string per row."""
        if isinstance(tokens, torch.Tensor) and tokens.dim() == 2:
            return [self.to_string(t) for t in tokens]
        ids = tokens.tolist() if isinstance(tokens, torch.Tensor) else list(tokens)
        return self._tok().decode(ids)

    def to_str_tokens(self, input: str | torch.Tensor, prepend_bos: bool | None = None) -> list[str]:
        """Each token of ``input`` as its own string."""
        ids = self.to_tokens(input, prepend_bos=prepend_bos)[0] if isinstance(input, str) else input
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError("to_str_tokens takes one sequence; index the batch first")
            ids = ids[0]
        return [self._tok().decode([i]) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]

    def to_single_token(self, string: str) -> int:
        """The id of ``string``; raises if it is not exactly one token."""
        ids = self._tok()(string, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"{string!r} is {len(ids)} tokens, not one: {ids}")
        return ids[0]

    def get_token_position(self, single_token: str | int, input: str | torch.Tensor, mode: str = "first",
                           prepend_bos: bool | None = None) -> int:
        """Position of ``single_token`` in ``input`` (``mode`` ``"first"`` or ``"last"``)."""
        tid = self.to_single_token(single_token) if isinstance(single_token, str) else int(single_token)
        ids = self.to_tokens(input, prepend_bos=prepend_bos) if isinstance(input, str) else input
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError("get_token_position takes one sequence")
            ids = ids[0]
        hits = (ids == tid).nonzero().flatten().tolist()
        if not hits:
            raise ValueError(f"token {tid} ({self.to_string([tid])!r}) does not occur in the input")
        if mode not in ("first", "last"):
            raise ValueError(f"mode must be 'first' or 'last', not {mode!r}")
        return hits[0] if mode == "first" else hits[-1]
