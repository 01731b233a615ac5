"""Model compression before compiling: quantization (and, later, pruning)."""
