"""Install: ``pip install -e ".[deepspeed,dev]"`` (see README for the CPU-only torch wheel)."""

from pathlib import Path

from setuptools import find_packages, setup

EXTRAS = {
    "deepspeed": ["deepspeed>=0.15"],
    "ray": ["ray[default]>=2.30"],
    "wandb": ["wandb>=0.17"],
    "peft": ["peft>=0.12"],
    "gguf": ["gguf>=0.10"],  # load .gguf checkpoints (dequantised by transformers)
    "flash": ["flash-attn>=2.6"],  # GPU only
    "vllm": ["vllm>=0.6"],  # GPU only
    "bench": ["trl>=0.20", "psutil", "gguf>=0.10"],
    "plot": ["matplotlib>=3.7"],
}
EXTRAS["dev"] = ["pytest>=8", "pytest-timeout>=2.3", "ruff>=0.6", "tensorboard>=2.15", *EXTRAS["deepspeed"],
                 *EXTRAS["wandb"], *EXTRAS["plot"], *EXTRAS["ray"], *EXTRAS["peft"], *EXTRAS["gguf"]]
EXTRAS["all"] = sorted({dep for name, deps in EXTRAS.items() if name not in ("flash", "vllm") for dep in deps})

setup(
    name="rlhf_lightning",
    version="0.1.0",
    description="RLHF (SFT, reward models, PPO over Ray, DPO family) as PyTorch Lightning modules on DeepSpeed",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["rlhf_lightning", "rlhf_lightning.*"]),
    package_data={"rlhf_lightning": ["assets/*/*"]},
    install_requires=[
        "torch>=2.4",
        "lightning>=2.4",
        "jsonargparse[signatures]>=4.30",
        "transformers>=4.51",
        "accelerate>=1.0",  # transformers needs it to load weights under a torch.device context (Lightning)
        "datasets>=3.0",
        "torchmetrics>=1.4",
        "torchdata>=0.8",  # StatefulDataLoader: mid-epoch resume
        "tokenizers>=0.20",
        "safetensors",
        "pyyaml",
    ],
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["rlhf-lightning=rlhf_lightning.__main__:main"]},
)
