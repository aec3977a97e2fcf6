"""Tiny random Qwen2 / Llama models and tokenizers, built offline (no hub access).

They exist for tests and smoke runs: the architecture code is the real transformers code, only the
sizes are small and the weights random. The tokenizer is a byte-level BPE trained on a small built-in
corpus, so any text (titles included) tokenizes, like the real Qwen/Llama tokenizers.

``tiny-qwen2`` mimics Qwen: no BOS token, EOS ``<|endoftext|>`` doubles as pad.
``tiny-llama`` mimics Llama: a BOS token ``<s>`` is prepended to every encoded text, EOS ``</s>``.

Known limit: a *saved* ``tiny-qwen2`` directory (a full fine-tune checkpoint) reloads its tokenizer as transformers'
``Qwen2Tokenizer``, which rebuilds Qwen2's own pre-tokenizer (digits one by one); this BPE was trained with a plain
byte-level one, so titles with digits then encode to other ids. Checkpoint tests of full fine-tunes use
``tiny-llama``, which reloads unchanged; retraining this BPE would change the ids every tiny test is built on.
"""

from __future__ import annotations

from functools import lru_cache

import torch

TINY_ALIASES = ("tiny-qwen2", "tiny-llama")

# Enough English and prompt wording for a BPE that produces multi-token titles.
_CORPUS = """
Below is an instruction that describes a task, paired with an input that provides further context.
Write a response that appropriately completes the request.
### Instruction:
Given a list of video games the user recetenly enjoy, please write a new video games that the user may bought
### User Input:
The user has palyed the following video gamess before: "Anno 2070", "Monopoly Tycoon - PC"
### Response:
The user bought these items before. Recommend the next item the user will buy.
Super Mario Bros. Zelda Breath of the Wild Nintendo Switch PlayStation 4 Xbox One PC Game Edition
Call of Duty Black Ops Grand Theft Auto Final Fantasy Pokemon Red Blue Yellow Dark Souls Minecraft
Halo The Elder Scrolls Skyrim Street Fighter Tetris Sonic the Hedgehog Metroid Prime Kirby Donkey Kong
Beyond the Frontier Collection Deluxe Ultimate Gold Limited Controller Wireless Headset Memory Card
Nail Polish Lacquer Lipstick Shampoo Toy Story GoldenEye Star Wars Kansas Greatest Hits Vol. 2
a an the of and or in on to for with by from at as is are was were be been 0 1 2 3 4 5 6 7 8 9 10 2010
"""


@lru_cache(maxsize=4)
def _trained_tokenizer_json(kind: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>"] if kind == "tiny-qwen2" else ["<s>", "</s>", "<unk>"]
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    if kind == "tiny-llama":
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def build_tiny_tokenizer(kind: str = "tiny-qwen2"):
    """A small byte-level BPE tokenizer shaped like Qwen2's (``tiny-qwen2``) or Llama's (``tiny-llama``)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    if kind not in TINY_ALIASES:
        raise ValueError(f"unknown tiny model '{kind}', expected one of {TINY_ALIASES}")
    backend = Tokenizer.from_str(_trained_tokenizer_json(kind))
    if kind == "tiny-qwen2":
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend, eos_token="<|endoftext|>", pad_token="<|endoftext|>"
        )
    else:
        tok = PreTrainedTokenizerFast(
            tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
        )
    tok.padding_side = "left"
    return tok


def build_tiny_model(
    kind: str = "tiny-qwen2",
    *,
    vocab_size: int | None = None,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
):
    """A small random causal LM of the real Qwen2 or Llama architecture.

    ``vocab_size`` defaults to the tiny tokenizer's size. Weights are drawn from ``seed`` so two
    calls give identical models; the global torch RNG state is not changed.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    if kind not in TINY_ALIASES:
        raise ValueError(f"unknown tiny model '{kind}', expected one of {TINY_ALIASES}")
    tok = build_tiny_tokenizer(kind)
    vocab = vocab_size or len(tok)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=2048,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    if kind == "tiny-qwen2":
        config = Qwen2Config(**common, bos_token_id=None)
    else:
        config = LlamaConfig(**common, bos_token_id=tok.bos_token_id)
    # The same draws as torch.manual_seed(seed), on a forked CPU generator: the caller's RNG state (CPU and CUDA) is
    # left as it was. Reseeding it globally made whatever a caller drew after loading a tiny model follow seed 0,
    # not the caller's own seed. The model is built on the CPU, so the weights are those of the global reseed.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model


def build_tiny(kind: str = "tiny-qwen2", **kwargs):
    """Return ``(model, tokenizer)`` for a tiny alias."""
    return build_tiny_model(kind, **kwargs), build_tiny_tokenizer(kind)
