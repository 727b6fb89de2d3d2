"""The small core every layer may depend on: input validation, the backend registry, the tuned
config loader and the results schema. Kernels depend on nothing above it."""
