"""Scale-out on Ray Serve: R engine replicas behind one OpenAI-compatible endpoint, routed by tenant.

:mod:`.settings` (``RaySettings``: what every replica builds itself from), :mod:`.deployment`
(``build_app``, ``app_builder`` for ``serve run``, ``run``), :mod:`.ingress` (the front door:
reads ``model``, checks the key, forwards; no engine, no torch), :mod:`.replica` (one engine and
its delta pool per replica), :mod:`.board` (every replica's metrics), :mod:`.asgi_bridge` (a
forwarded request through the usual FastAPI app). Nothing is imported here, so reading the
settings needs neither Ray nor torch.

    bitdelta serve --ray --base models/tiny/base --delta-store deltas/ --replicas 2
    serve run bitdelta.serving.ray.deployment:app_builder base=models/tiny/base store=s3://bucket/deltas
"""
