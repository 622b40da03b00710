"""Data for LF-VILA: annotation readers, video decoding and transforms, tokenisation, datasets, demo data.

Submodules are imported lazily by their users (``from lfvila_model.data import video``) so that importing the
package does not pull in PyAV or transformers.
"""
