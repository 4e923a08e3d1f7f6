"""Tasks the trainer can learn: each gives problems, a JSONL format and a sentence reward."""
