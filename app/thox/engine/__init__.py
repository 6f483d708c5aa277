"""Inference engine: loaded models (model.py), their request queues and
worker threads (scheduler.py) and which models are resident (manager.py)."""
