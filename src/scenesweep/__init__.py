"""scenesweep: tracked, searchable transfer-learning studies of VGG image classifiers.

Stages, one module each (imports point one way, left to right):
cli -> search / tracking / registry / serving -> features / training -> data / backbone / heads -> config
"""
__version__ = "0.1.0"
