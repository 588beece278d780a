"""aedist: train autoencoders from WebDataset shards with Accelerate, on one GPU to a SLURM cluster."""

__version__ = "0.1.0"
