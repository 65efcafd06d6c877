"""Measuring generated digits: an MNIST judge classifier, conditional accuracy, Fréchet MNIST distance."""
