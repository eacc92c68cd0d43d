"""The outbound side of the mesh: calls this service makes through its httpx client.

``call`` decides everything about one call as a generator of effects (sans-IO); ``transport``
holds its two httpx drivers (sync and async); ``destination`` the run-time state of one
destination service; ``mtls`` the client side of mutual TLS (the SVID presented, the server's
identity checked).
"""
