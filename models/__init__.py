"""Network modules of the text-to-digit diffusion model."""
