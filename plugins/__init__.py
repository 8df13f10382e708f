"""Built-in kfe plugins (installed as ``kfe_plugins``): rules and layer adapters.

Each module is one plugin, registered through the ``kfe`` entry-point group in
``pyproject.toml`` exactly as a third-party package registers its own.
"""
