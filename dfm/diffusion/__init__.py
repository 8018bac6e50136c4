"""The diffusion core: Gaussian paths, schedules, preconditioning, losses, samplers and guidance."""
