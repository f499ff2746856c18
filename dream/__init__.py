"""dream: DREAM diffusion training and sampling for 64x64 faces, with Triton kernels in the UNet."""
__version__ = "0.1.0"
