"""DALL·E (Ramesh et al. 2021): the discrete VAE tokenizer and the transformer over [text; image] tokens."""
