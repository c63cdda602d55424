"""LeRobot dataset files <-> ``Episode``: the layout (``format``), the ``writer``, the validating ``reader`` and the
quarantining ``importer``."""
