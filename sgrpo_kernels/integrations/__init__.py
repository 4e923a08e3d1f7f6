"""Glue to other libraries (Hugging Face transformers, TRL); each module imports its library lazily."""
