"""A small chat template for the tiny test tokenizers (which have none): chat prompts need one."""

from __future__ import annotations

import shutil
from pathlib import Path

CHAT_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")


def with_chat_template(model_dir: Path, out: Path) -> Path:
    """A copy of the HF folder `model_dir` at `out` whose tokenizer has `CHAT_TEMPLATE`."""
    shutil.copytree(model_dir, out)
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    return out
