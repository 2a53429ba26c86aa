"""Measuring a model after a round: the global test set, personalised views, anytime evaluation."""
