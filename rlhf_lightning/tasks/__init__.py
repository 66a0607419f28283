"""Small synthetic tasks with exactly checkable answers, for demos and tests (no hub needed)."""
