"""A causal LM with a scalar value head on its last hidden state, saved beside the HF folder.

`save_pretrained(dir)` writes the causal LM exactly as transformers does (so `AutoModelForCausalLM` and vLLM
load `dir` as is) plus the head in its own file `dir/value_head.safetensors`; `from_pretrained(dir)` loads
both, or starts a fresh (zero) head when the file is absent (e.g. from an SFT folder).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

VALUE_HEAD_FILE = "value_head.safetensors"


class ValueHead(nn.Module):
    """Linear map hidden [..., H] -> value [...] in fp32, initialised to zero (values start at 0)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.summary = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.summary.weight)
        nn.init.zeros_(self.summary.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.summary(hidden.to(self.summary.weight.dtype)).squeeze(-1).float()


class AutoModelForCausalLMWithValueHead(nn.Module):
    """`pretrained_model` (a transformers causal LM) plus `v_head` (a `ValueHead`), TRL's names.

    Usable as the policy with a shared-backbone critic, or as a separate critic (`values` only).
    """

    def __init__(self, pretrained_model: nn.Module) -> None:
        super().__init__()
        self.pretrained_model = pretrained_model
        self.v_head = ValueHead(pretrained_model.config.get_text_config().hidden_size)

    @property
    def config(self):
        return self.pretrained_model.config

    @classmethod
    def from_pretrained(cls, path: str | Path, **kwargs) -> "AutoModelForCausalLMWithValueHead":
        """Load the causal LM from `path` (kwargs go to `AutoModelForCausalLM.from_pretrained`) and the value
        head from `path/value_head.safetensors` when present."""
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        model = cls(AutoModelForCausalLM.from_pretrained(path, **kwargs))
        head_file = Path(path) / VALUE_HEAD_FILE
        if head_file.exists():
            model.v_head.load_state_dict(load_file(str(head_file)))
        return model

    def save_pretrained(self, path: str | Path, **kwargs) -> None:
        """Save the causal LM as transformers does and the value head to `path/value_head.safetensors`."""
        from safetensors.torch import save_file

        path = Path(path)
        self.pretrained_model.save_pretrained(path, **kwargs)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.v_head.state_dict().items()}
        save_file(state, str(path / VALUE_HEAD_FILE))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids [B, L] -> (logits [B, K, V], values [B, K]) over the last K = logits_to_keep positions
        (all L when 0), from one pass through the backbone."""
        logits, hidden = self._backbone(input_ids, attention_mask, position_ids, logits_to_keep, logits_to_keep)
        return logits, self.v_head(hidden)

    def values(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Values [B, K] only (as a separate critic): the LM head runs on one position."""
        _, hidden = self._backbone(input_ids, attention_mask, position_ids, 1, logits_to_keep)
        return self.v_head(hidden)

    def _backbone(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        lm_positions: int,
        keep: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One pass: (logits [B, lm_positions, V] (all L when 0), the final hidden states [B, K, H] of the
        last K = keep positions (all L when 0), after the final norm)."""
        out = self.pretrained_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            logits_to_keep=lm_positions,
            output_hidden_states=True,
            use_cache=False,
        )
        hidden = out.hidden_states[-1]  # [B, L, H]
        if keep:
            hidden = hidden[:, -keep:]  # [B, K, H]
        return out.logits, hidden

    def generate(self, *args, **kwargs):
        """`transformers` generation of the underlying causal LM."""
        return self.pretrained_model.generate(*args, **kwargs)
