"""sae-workbench: train TopK, Gated, Switch and ReLU sparse autoencoders and look inside them."""
__version__ = "0.1.0"
