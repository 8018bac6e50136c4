"""dfm: video diffusion models, EDM and flow matching on one core."""

__version__ = "0.1.0"
