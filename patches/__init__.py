"""Small, version-guarded runtime patches to upstream libraries (each with a test)."""
