"""Recipes: end-to-end jobs the CLI runs (they print; the library does not)."""
