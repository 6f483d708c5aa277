"""The HTTP API. A request goes: route (``routes.py`` for the OpenAI API and
the device; ``responses.py``, ``anthropic.py`` and ``ollama.py`` translate
their protocols through ``chatbridge.py``) → request body (``body.py``,
validated by the models of ``schemas.py``) → use case (``service.py``, with
``translate.py`` between OpenAI shapes and engine jobs) → engine
(``thox.engine``) → model store (``thox.store``). Answers are the models of
``response_models.py`` (and ``ollama_models.py``), written out by
``wire.py``; ``openapi.py`` documents both sides from the same models.
Errors are mapped to the OpenAI shape in one place (``errors.py``). The
app's lifetime objects are one ``AppState`` (``state.py``), built by
``app.py``."""
