"""Small shared helpers (file-system safety, checkpoint reading)."""
