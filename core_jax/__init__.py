"""core_jax: retrieval-enriched zero-shot image classification (CoRE) in JAX."""

__version__ = "0.1.0"
