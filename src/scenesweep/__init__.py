"""scenesweep: tracked, searchable transfer-learning studies of image classifiers (VGG and other torchvision backbones).

Layers, from the top down (each imports only those below it; tests/test_layers.py checks it):
cli -> report -> runs -> models -> tracking, search -> specs -> compute, services -> core
"""
__version__ = "0.1.0"
