"""`HuggingFaceGenerationModelAdapter`: run `transformers`' own ``generate()`` on an nx model.

HF's generation loop (logits processors, sampling, beam bookkeeping, ``num_return_sequences``)
runs on the host; each forward call is one nx program: a prefill when HF presents a new batch
of sequences, a one-token decode when it presents the previous sequences plus one token.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from nx.generation import SamplingParams
from nx.hfconfig import ResolvedConfig
from nx.model import NxModel
from nx.session import Session


class HuggingFaceGenerationModelAdapter(PreTrainedModel, GenerationMixin):
    """Wrap `nx_model` so ``adapter.generate(...)`` is Hugging Face's ``generate()``.

    The nx model's `batch_size` must equal the number of sequences HF runs (prompts times
    ``num_return_sequences``). Each ``generate()`` call holds one `nx.session.Session` (every
    row of the nx model's KV cache) until it returns.
    """

    main_input_name = "input_ids"
    _supports_cache_class = False
    _supports_sdpa = True  # attention runs in nx; nothing for HF to dispatch

    def __init__(self, config: PretrainedConfig | ResolvedConfig, nx_model: NxModel) -> None:
        super().__init__(config.to_transformers() if isinstance(config, ResolvedConfig) else config)
        self.nx_model = nx_model
        self.generation_config.use_cache = False  # nx keeps its own on-device cache
        self._anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # gives HF a device/dtype
        self.reset_generation()

    def reset_generation(self) -> None:
        """Close the open session, if any (``generate`` does it when it returns)."""
        if getattr(self, "_session", None) is not None:
            self._session.close()
        self._session: Session | None = None
        self._seen: np.ndarray | None = None  # the rows (token ids and attention mask) last run

    def generate(self, *args: Any, **kwargs: Any):
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.reset_generation()

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        ids = input_ids.detach().cpu().numpy()
        mask = None if attention_mask is None else attention_mask.detach().cpu().numpy()
        rows = np.concatenate([ids, np.ones_like(ids) if mask is None else mask], axis=1)
        m = self.nx_model
        source = self._continued_rows(rows)
        if source is None:
            self.reset_generation()
            self._session = m.session(m.prepare(ids, mask), SamplingParams())
            _, logits = self._session.start()
        else:
            if not np.array_equal(source, np.arange(len(source))):
                self._session.reorder(source)
            _, logits = self._session.step(m.put(ids[:, -1].astype(np.int32)))
        self._seen = rows
        out = torch.from_numpy(np.array(logits, dtype=np.float32))[:, None, :]
        return CausalLMOutputWithPast(logits=out)

    def _continued_rows(self, rows: np.ndarray) -> np.ndarray | None:
        """For a batch that extends rows run before by one token each (token ids and mask side by
        side), the earlier row each one continues; None when it is a new batch to encode."""
        prev = self._seen
        if self._session is None or prev is None or rows.shape != (prev.shape[0], prev.shape[1] + 2):
            return None
        n = prev.shape[1] // 2
        before = np.concatenate([rows[:, :n], rows[:, n + 1 : -1]], axis=1)  # drop the new token and its mask bit
        where = {r.tobytes(): i for i, r in enumerate(prev)}
        source = [where.get(r.tobytes()) for r in before]
        return None if None in source else np.array(source)
