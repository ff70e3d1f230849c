"""bitcore: BiT (Big Transfer) models, checkpoints, HyperRule, data, training and prediction.

A plain library: torch, numpy, Pillow and safetensors only; no web or queue code.
"""

__version__ = "0.1.0"
