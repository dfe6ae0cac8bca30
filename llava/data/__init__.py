"""llava/data package."""
