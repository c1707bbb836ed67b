"""digitsapp: handwritten digits with PyTorch and Flower."""
