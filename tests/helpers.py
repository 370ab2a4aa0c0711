"""What several test modules and worker processes build: tiny models from configs, token batches,
real SST-2 sentences, free ports. Plain functions (no pytest), so worker scripts import them too."""

from __future__ import annotations

import socket
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]
BUNDLED = ROOT / "src/eva_lora/app/data"
VOCAB = 101


def tiny_llama(seed: int = 0, layers: int = 2, vocab: int = VOCAB, positions: int = 64, **extra):
    """A Llama: hidden 32, intermediate 48, GQA (4 heads, 2 kv heads), random weights, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=positions,
        **extra,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GPT2LMHeadModel(
            GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64)
        ).eval()


def tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=VOCAB,
        max_position_embeddings=64,
        num_labels=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return BertForSequenceClassification(cfg).eval()


def token_batches(
    vocab: int, n_batches: int, batch: int = 4, seq: int = 16, seed: int = 0, pad_tail: bool = True
) -> list[dict[str, torch.Tensor]]:
    """Random token batches whose last positions are padding in half the rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(0, vocab, (batch, seq), generator=g)
        mask = torch.ones(batch, seq, dtype=torch.long)
        if pad_tail:
            mask[::2, seq // 2 :] = 0
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def sst2_sentences(n: int, split: str = "train") -> list[str]:
    path = BUNDLED / ("sst2_train_1000.tsv" if split == "train" else "sst2_test_300.tsv")
    lines = path.read_text(encoding="utf-8").splitlines()[:n]
    return [line.split("\t", 1)[1] for line in lines]


def free_port() -> int:
    """A TCP port the OS says is free now (for torchrun / accelerate rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def minilm_batches(tokenizer, n_sentences: int, batch: int = 16, max_length: int = 64):
    """Real SST-2 sentences in MiniLM batches (padded per batch)."""
    sentences = sst2_sentences(n_sentences)
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(
            sentences[i : i + batch],
            padding=True,
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        )
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def exact_stats(model, batches, config) -> dict:
    """float64 exact statistics over the same batches (the reference), keyed by group leader."""
    from eva_lora.capture import collect_statistics

    return {g.names[0]: g.stats for g in collect_statistics(model, batches, config)}
