"""dcscale: DeepCluster as a distributed training system, with the Deep Dive analysis tools."""

__version__ = "0.1.0"
