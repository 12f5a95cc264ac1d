"""What runs inside Triton's python backend, importable (and tested) outside it.

Each python-backend target's ``model.py`` (``model_repository/python_*``) binds one of these to Triton's
``triton_python_backend_utils``. Imports :mod:`export.contract` and :mod:`export.models`."""
