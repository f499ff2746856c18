from setuptools import find_packages, setup

setup(
    name="dream-diffusion",
    version="0.1.0",
    description="DREAM diffusion training and sampling for 64x64 faces, with Triton kernels in the UNet",
    packages=find_packages(include=["dream", "dream.*", "kernels", "kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11",
        "torchvision>=0.26",
        "numpy",
        "pillow",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.6"],
        "eval": ["torch-fidelity>=0.3"],
        "export": ["safetensors>=0.4"],
        "test": ["pytest>=8", "pytest-xdist>=3", "pytest-benchmark>=4", "triton>=3.6", "torch-fidelity>=0.3",
                 "safetensors>=0.4"],
    },
    entry_points={"console_scripts": ["dream = dream.cli:main"]},
)
