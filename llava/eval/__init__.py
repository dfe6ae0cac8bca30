"""llava/eval package."""
