"""Activation sources: synthetic activations built from known feature directions."""
