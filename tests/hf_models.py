"""Tiny random Hugging Face models (built locally with transformers on torch CPU) and a tokenizer.json."""

from __future__ import annotations

import os

import numpy as np

WORDS = ("the king queen sea storm night love death ship island sword crown fool wine music letter "
         "ring brother sister father daughter ghost castle duke lady garden spirit").split()
VARIANTS = ("llama_gqa", "llama_tied_llama3", "llama_linear", "mistral", "gpt2")


def hf_config(variant: str):
    """A transformers config for one tested family/variant (vocab 128, 2 layers)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig

    common = dict(vocab_size=128, num_hidden_layers=2, max_position_embeddings=64, rms_norm_eps=1e-5)
    if variant == "llama_gqa":  # grouped-query attention, untied output layer
        return LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=4,
                           tie_word_embeddings=False, **common)
    if variant == "llama_tied_llama3":  # tied, head_dim != hidden/heads, Llama 3.1 RoPE scaling
        return LlamaConfig(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=24, tie_word_embeddings=True, rope_theta=500000.0,
                           rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                           **common)
    if variant == "llama_linear":  # multi-head, linear RoPE scaling
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=4,
                           rope_scaling={"rope_type": "linear", "factor": 4.0}, **common)
    if variant == "mistral":
        return MistralConfig(hidden_size=64, intermediate_size=96, num_attention_heads=8, num_key_value_heads=2,
                             sliding_window=None, **common)
    if variant == "gpt2":
        return GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                          embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=2, eos_token_id=2)
    raise ValueError(variant)


def random_model(variant: str, seed: int = 0):
    """The transformers model of ``variant`` in eval mode, every parameter random (norms near 1)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(variant))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or ".ln_" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


BERT_ARCHS = ("BertForPreTraining", "BertForMaskedLM")


def random_bert(arch: str, seed: int = 0, **config):
    """A tiny transformers BERT of class ``arch`` in eval mode, every parameter random (LayerNorms near 1)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **config)
    model = getattr(transformers, arch)(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
    return model.eval()


def save(variant: str, path: str, seed: int = 0, tokenizer: bool = True, **save_kw) -> str:
    """Saves a random ``variant`` model (and a word-level tokenizer.json) to ``path``."""
    model = random_model(variant, seed)
    model.save_pretrained(path, **save_kw)
    if tokenizer:
        write_tokenizer(os.path.join(path, "tokenizer.json"))
    return path


def write_tokenizer(path: str) -> None:
    """A word-level tokenizer.json (ids < 128) with <unk>, <s> and </s>."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    for i, ch in enumerate(".,;:!?"):
        vocab[ch] = len(WORDS) + 3 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(path)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(5, 40)))) + " ." for _ in range(n)]
