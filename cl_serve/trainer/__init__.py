"""Trainer: learn tasks with low-rank branches on a frozen timm ViT and merge them into plain weights.

Imports torch and timm, never ray or fastapi (the GPU training image has neither).
"""
