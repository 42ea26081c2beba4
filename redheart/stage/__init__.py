"""A pipeline stage, split by job; shared by the CPU and GPU stage processes (cpu_stage/, gpu_stage/).

gRPC side: ``wire.py`` (messages in and out, status of each failure), ``peer_link.py`` (the
sender to the neighbouring stage), ``servicer.py`` (PipelineStage: decode, delegate, answer),
``server.py`` (the server factory), ``metrics.py`` (the stage metrics factory), ``main.py`` (the
stage process main, on redheart/service_main.py).
"""
