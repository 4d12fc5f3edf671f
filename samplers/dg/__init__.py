"""Discriminator guidance (Kim et al., ICML 2023): the discriminator's networks (`networks`), its noise convention,
encoders and files (`discriminator`). The guidance itself is in samplers/guidance.py; training in training/dg.py."""
