"""Metrics as pure functions of predictions and labels: long-tailed classification, continual learning."""
