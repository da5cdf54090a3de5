"""The module models logged before ``scenesweep.models`` existed name (their pickled classes
point here): kept so that those models still load. New code imports ``scenesweep.models.pyfunc``."""
from .models.pyfunc import HeadModel, ImageClassifier, InputError  # noqa: F401
