"""Speed and memory benchmarks, kept beside the package (not shipped in it)."""
