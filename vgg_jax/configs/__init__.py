"""The paper's protocol as config defaults (``paper``) and the built-in dataset's demo values
(``demo``): plain ``ml_collections`` data that ``experiments/*.py`` shrink or extend."""
