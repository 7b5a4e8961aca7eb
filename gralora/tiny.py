"""Build a tiny Llama model and a byte-level BPE tokenizer offline, for tests and demos."""

from __future__ import annotations

from pathlib import Path

# A Llama config (not qwen2): transformers would swap a qwen2 tokenizer for Qwen's own.
TINY_HIDDEN = 128
TINY_INTERMEDIATE = 256
TINY_LAYERS = 2
TINY_HEADS = 4
TINY_VOCAB = 512

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = [
    "hello how are you today",
    "i am fine thank you and you",
    "what is the weather like",
    "the quick brown fox jumps over the lazy dog",
    "graLoRA splits each weight into a grid of blocks",
    "low rank adaptation trains small matrices beside a frozen weight",
    "user assistant system messages content role",
    "0123456789 + - * / = ? ! . , : ; ' \" ( ) [ ] { }",
]


def build_tiny_tokenizer(vocab_size: int = TINY_VOCAB):  # type: ignore[no-untyped-def]
    """A byte-level BPE PreTrainedTokenizerFast with chat special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_tiny_model(output_dir: str | Path, *, seed: int = 0, hidden_size: int = TINY_HIDDEN,
                     num_layers: int = TINY_LAYERS) -> Path:
    """Write a randomly initialised tiny Llama and its tokenizer to `output_dir` (safetensors)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=TINY_HEADS,
        num_key_value_heads=TINY_HEADS,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out
