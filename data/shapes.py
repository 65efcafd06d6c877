"""The shapes every part of the project agrees on: MNIST's images and digits, the text tokens the UNet
is conditioned on, and the names of the handwriting measures (computed by data/morphometry.py, which
alone needs SciPy and scikit-image). Import them from here; never write them again."""

NUM_DIGITS = 10
IMAGE_SIZE = 28
IMAGE_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)  # channels, height, width of one digit
TEXT_TOKENS = 8  # CLIP context length: the start token, up to 6 BPE tokens, the end token
TEXT_DIM = 512  # width of the CLIP ViT-B/32 text tower's token states
MEASURES: tuple[str, ...] = ("area", "length", "thickness", "slant", "width", "height")  # data/morphometry.py
