"""The TVM side shared by targets: the one place that knows TVM's moving API names."""
