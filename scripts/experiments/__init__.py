"""Importable pieces of the project's training scripts (data loading, models, experiments).

Not imported by ``softmax_jax`` itself: these modules use the ``scripts`` extra
(scikit-learn, matplotlib, tqdm), which the library does not depend on.
"""
