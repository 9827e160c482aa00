"""Microsoft Agent Framework chat client backed by a local kvchat engine.

Needs the ``agent-framework`` extra (``pip install 'kvchat[agent-framework]'``).

- :class:`KVChatClient`: the chat client (function invocation, middleware and
  telemetry layers included), for ``get_response`` and ``as_agent``;
- :class:`RawKVChatClient`: the same without the framework's layers;
- :class:`KVChatOptions`: its options (Agent Framework's `ChatOptions` plus
  kvchat's sampling options, `cache_key` and `overflow`);
- :func:`messages_to_dicts`: Agent Framework messages as the OpenAI-shaped history
  :func:`kvchat.chat.complete` takes.
"""

from kvchat.integrations.agent_framework.client import KVChatClient, RawKVChatClient
from kvchat.integrations.agent_framework.messages import messages_to_dicts
from kvchat.integrations.agent_framework.options import KVChatOptions

__all__ = ["KVChatClient", "KVChatOptions", "RawKVChatClient", "messages_to_dicts"]
