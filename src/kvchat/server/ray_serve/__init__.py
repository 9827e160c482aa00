"""kvchat on Ray Serve: engine replicas behind prefix-affinity routing, one OpenAI endpoint.

Needs the ``kvchat[ray]`` extra. :func:`build_app` makes the Serve application
(an ingress that forwards to ``num_replicas`` kvchat replicas, each holding one
engine and the whole kvchat HTTP app); ``kvchat serve --ray`` runs it. The
routing logic (:class:`PrefixAffinityPolicy`) imports no Ray.
"""
