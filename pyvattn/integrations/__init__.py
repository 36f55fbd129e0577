"""pyvattn under other people's code.

* :mod:`pyvattn.integrations.transformers` -- ``VAttentionCache``, a Hugging Face transformers
  ``Cache`` whose keys and values live in a :class:`pyvattn.KVCache` (``pip install pyvattn[hf]``).
* :mod:`pyvattn.integrations.tiny` -- small decoder-only model configs (Llama, Mistral, Qwen2,
  Qwen3 shapes) built with random weights, for tests, benchmarks and ``python -m pyvattn serve``
  without downloading anything.

Nothing here is imported by ``import pyvattn``: transformers stays optional.
"""
