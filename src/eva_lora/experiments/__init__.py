"""Experiments the command line does not serve: the paper's non-language settings at small scale.

- :mod:`~eva_lora.experiments.decision`: Meta-World demonstrations, Decision Transformer
  pre-training and LoRA / EVA fine-tuning (``pip install 'eva-lora[decision]'``), for
  ``benchmarks/paper_check/decision.py``.
- :mod:`~eva_lora.experiments.vision`: the ImageNet-pretrained EfficientNet-Lite0 (PyPI) and
  scikit-learn's digits, for ``benchmarks/paper_check/vision.py``.

They use the core (``compute_eva_state``, ``apply_eva_state``) like any user would; nothing in
``eva_lora`` or ``eva_lora.app`` imports them.
"""
