"""`mmstack.generation`: VQ-16 tokenizer and autoregressive image tokens, JanusFlow rectified flow, VAE."""
