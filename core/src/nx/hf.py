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
from nx.model import NxModel


class HuggingFaceGenerationModelAdapter(PreTrainedModel, GenerationMixin):
    """Wrap `nx_model` so ``adapter.generate(...)`` is Hugging Face's ``generate()``.

    The nx model's `batch_size` must equal the number of sequences HF runs (prompts times
    ``num_return_sequences``). Call `reset_generation()` between unrelated generate calls if
    you interleave them with other use of the same nx model.
    """

    main_input_name = "input_ids"
    _supports_cache_class = False
    _supports_sdpa = True  # attention runs in nx; nothing for HF to dispatch

    def __init__(self, config: PretrainedConfig, nx_model: NxModel) -> None:
        super().__init__(config)
        self.nx_model = nx_model
        self.generation_config.use_cache = False  # nx keeps its own on-device cache
        self._anchor = torch.nn.Parameter(torch.zeros(0), requires_grad=False)  # gives HF a device/dtype
        self.reset_generation()

    def reset_generation(self) -> None:
        self._run: Any = None
        self._seen: np.ndarray | None = None

    @classmethod
    def can_generate(cls) -> bool:
        return True

    def prepare_inputs_for_generation(self, input_ids: torch.Tensor, attention_mask=None, **kwargs):
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        ids = input_ids.detach().cpu().numpy()
        m = self.nx_model
        prev = self._seen
        if (
            self._run is not None
            and prev is not None
            and ids.shape[0] == prev.shape[0]
            and ids.shape[1] == prev.shape[1] + 1
            and np.array_equal(ids[:, :-1], prev)
        ):
            _, logits = m._next(self._run, m._put(ids[:, -1].astype(np.int32)))
        else:
            clean, pad = m._prepare(ids, None if attention_mask is None else attention_mask.cpu().numpy())
            self._run, _, logits = m._start(clean, pad, SamplingParams())
        self._seen = ids
        out = torch.from_numpy(np.array(logits, dtype=np.float32))[:, None, :]
        return CausalLMOutputWithPast(logits=out)
