"""Inference engine: loaded models (model.py), their slots and decode loop
(slots.py, scheduler.py), embeddings (embedder.py) and which models are
resident (manager.py).

llama.cpp's CPU backend synchronises its threads with OpenMP barriers. By
default libgomp spins at a barrier; when other processes compete for the
cores (the web page, a second model, a build), a spinning thread burns the
time slice its partner needs, and a decode step gets many times slower.
Passive waiting keeps steps steady under load (and should cost little on
an idle machine), so it is the default here; set OMP_WAIT_POLICY=ACTIVE in the
service's environment to spin. It must be set before llama.cpp is loaded.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
