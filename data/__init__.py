"""MNIST, its measured handwriting, and the captions that condition the model.

Import from the modules (``data.mnist``, ``data.captions``, ...): this package imports none of them, so
that reading the caption vocabulary costs neither SciPy nor scikit-image (only data/morphometry.py
needs them)."""
