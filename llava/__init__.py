"""pivot's training library: a LLaVA-OneVision-style MLLM on transformers' Llava classes.

Follows Song et al. 2025, "RL makes MLLMs see better than SFT" (arXiv 2510.16333).
"""
