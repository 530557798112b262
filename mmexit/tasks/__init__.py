"""Tasks: what differs per task (schema, data, model, statistics, evaluation), one file each.

``base.py`` the interface; ``text_classification.py`` + ``text_schema.py``; ``captioning.py`` +
``caption_schema.py``. The task table is ``mmexit.recipe.tasks.TASKS``.
"""
