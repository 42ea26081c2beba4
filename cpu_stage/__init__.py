"""The CPU stage service: token + position embeddings and the first transformer layers."""
