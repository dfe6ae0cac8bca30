"""llava/train package."""
