"""Fails early, naming the extra to install, when a package of the `model` extra is missing.

Imported first by ``lfvila_model/__init__.py``: without it a bare ``pip install lfvila`` would fail deep inside
text_encoder with a plain ``No module named 'transformers'``.
"""

try:  # the text tower is built on transformers' BERT layers
    import transformers  # noqa: F401
except ImportError as e:
    raise ImportError(f"lfvila_model needs the 'model' extra (transformers, pyyaml, matplotlib, ...): "
                      f"pip install 'lfvila[model]' ({e})") from e
