"""Rollout workers (generation, reference, reward), their local/Ray engine, and reward functions."""
