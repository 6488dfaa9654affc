"""framp_jax: FRAMP and model-heterogeneous federated learning baselines in pure-functional JAX."""

__version__ = "0.1.0"
