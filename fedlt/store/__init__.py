"""What a run keeps on disk: safe checkpoints, metrics files and the run-folder lock."""
