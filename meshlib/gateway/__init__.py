"""The ingress gateway: traffic from outside the mesh, verified at the edge and re-encrypted
into the mesh (CONTROL-PLANE.md §7; configured by meshlib.config.gatewaykind).

``tls`` terminates TLS per listener port with a certificate chosen by SNI and optional client
certificates for partners; ``edge`` holds the pure edge-hygiene decisions (headers only the mesh
may set, ``forwarded`` / ``x-forwarded-*``, request limits, ambiguous framing); ``app`` is the
ASGI app that routes a request by the Gateway's HTTPRoutes and forwards it, streamed, through the
mesh's transport; ``ratelimit`` keeps the per-client-IP and per-subject token buckets;
``websocket`` passes an upgrade the app routed through to one backend endpoint (wsproto, the
``gateway`` extra); ``serve`` runs the listeners under uvicorn (``meshctl gateway serve``).
"""
