"""Automatic permutation specs across the timm and torchvision model zoos."""
