"""The typed config tree: generic machinery (tree), the trainer's keys (schema), their checks
(validation) and where configs come from (recipes)."""
