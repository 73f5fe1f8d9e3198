"""Per-layer attributions and representation diagnostics for PyTorch autoencoders.

The methods (DeepSHAP, Captum layer attributions, attention and representation
diagnostics) arrive with the interpretation work; the package exists from the start so
that both packages install and are imported the same way.
"""
