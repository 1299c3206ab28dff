"""DALL·E 2 / unCLIP (Ramesh et al. 2022): CLIP-embedding priors and the unCLIP pipeline."""
