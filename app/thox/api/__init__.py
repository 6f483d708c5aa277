"""HTTP layer: routes (routes.py) → OpenAI schemas (schemas.py) and
translation (translate.py) → engine (thox.engine) → model store (thox.store).
Errors are mapped to the OpenAI shape in one place (errors.py)."""
