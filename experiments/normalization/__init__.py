"""BatchNorm vs GroupNorm vs GroupNorm + Weight Standardization, measured on a small ResNetV2.

The evidence behind docs/normalization.md. BiT (Kolesnikov et al., ECCV 2020) replaced BatchNorm
with GroupNorm (Wu & He, ECCV 2018) + Weight Standardization (Qiao et al., arXiv:1903.10520)
because its per-device batch was small (4096 images over 512 chips = 8 per chip). This package
simulates that data-parallel setting faithfully on one CPU (see chunked_bn.py) and measures what
the choice of normalization does to accuracy, to transfer, and to speed.

Run: ``python -m experiments.normalization.run`` (full) or ``--quick`` (seconds, for tests).
"""
