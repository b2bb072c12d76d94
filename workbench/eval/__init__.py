"""Evaluation: reconstruction, sparsity, dead/dense-latent and Switch-routing metrics."""
