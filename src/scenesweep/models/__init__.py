"""MLflow models: the pyfunc classes (``pyfunc``), logging them into a run (``logged``), and the
model registry on top (``registry``)."""
