"""A causal LM with a scalar value head on its last hidden state; the head is saved in a file of its own.

`save_pretrained(dir, value_head_file=f)` writes the causal LM exactly as transformers does and the head to
`f`: a policy's head goes beside its folder (a trained policy's folder then loads in transformers and vLLM as
is — vLLM reads every `*.safetensors` of a folder and refuses a `summary` parameter), a separate critic keeps
its own in its folder (`dir/value_head.safetensors`, the default). `from_pretrained` reads the same file, or
starts a fresh (zero) head when there is none (e.g. from an SFT folder).
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
    def from_pretrained(cls, path: str | Path, *, value_head_file: str | Path | None = None,
                        **kwargs) -> "AutoModelForCausalLMWithValueHead":
        """Load the causal LM from `path` (kwargs go to `AutoModelForCausalLM.from_pretrained`) and the value
        head from `value_head_file` (default `path/value_head.safetensors`) when that file exists."""
        from transformers import AutoModelForCausalLM

        model = cls(AutoModelForCausalLM.from_pretrained(path, **kwargs))
        model.load_value_head(Path(value_head_file) if value_head_file is not None else Path(path) / VALUE_HEAD_FILE)
        return model

    def load_value_head(self, head_file: Path) -> bool:
        """Load the head's weights from `head_file` if it exists; whether it did."""
        from safetensors.torch import load_file

        if not head_file.is_file():
            return False
        self.v_head.load_state_dict(load_file(str(head_file)))
        return True

    def save_pretrained(self, path: str | Path, *, value_head_file: str | Path | None = None, **kwargs) -> None:
        """Save the causal LM to `path` as transformers does and the value head to `value_head_file` (default
        `path/value_head.safetensors`: pass a file outside `path` when `path` is to be served)."""
        path = Path(path)
        self.pretrained_model.save_pretrained(path, **kwargs)
        self.save_value_head(Path(value_head_file) if value_head_file is not None else path / VALUE_HEAD_FILE)

    def save_value_head(self, head_file: Path) -> None:
        """The head's weights alone, as a safetensors file."""
        from safetensors.torch import save_file

        head_file.parent.mkdir(parents=True, exist_ok=True)
        state = {name: tensor.detach().contiguous().cpu() for name, tensor in self.v_head.state_dict().items()}
        save_file(state, str(head_file))

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
