"""Front ends that plug kvchat into other frameworks.

Each subpackage needs its framework installed (an optional extra); importing
`kvchat.integrations` itself imports none of them.
"""
