"""Evaluation: perplexity, cost, routing statistics and plots."""
