"""Text conditioning: the transformer text encoder (GLIDE) and CLIP (genzoo's and open_clip's)."""
