"""moshi_eval: long-context audio cross-entropy of a streaming Moshi model (LibriLight audiobooks)."""
